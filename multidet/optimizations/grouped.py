"""``grouped``: the set's networks as one module, what they share once and their own parts stacked.

What the models share (``multidet.sharing``: found from the weights) runs once (``StackedShared``); where
models branch, their own parts (everything, for models that share nothing) are ONE fused super-model
(``merge_networks``), fed the shared state repeated once per model. The super-model of M same-architecture
networks, built once at load time:

1. BatchNorm is folded into the convolution before it (conv weights scaled by gamma/sigma, bias
   absorbs the shift); a BatchNormAct2d leaves only its activation behind.
2. Every convolution of the three becomes ONE convolution over channel-concatenated tensors:
   ``groups x 3`` (a depthwise conv of C channels becomes groups = 3C), weights concatenated along
   the output channels. The stem conv, whose input (the image) is shared, is a plain conv with
   3x the output channels, so the image is never copied three times.
3. The remaining per-channel ops (BatchNorm in the heads, which is per level and not folded,
   activations, pooling, resampling) work unchanged on 3x the channels; the BiFPN's learned fusion
   weights become per-channel-group weights (``MergedFpnCombine``).
4. The class head's last conv (a 1x1 conv with 810/63/180 outputs, the only layer whose shape
   differs) stays one conv per model, each on its model's channel group (``SplitPointwise``), the
   outputs concatenated (1053 channels). Padding it to one grouped conv of 3 x 810 outputs would
   compute 1377 channels of zeros: ~0.48 of ~3.7 GMAC per image, 13 % of the three networks.

For three models that share nothing, one forward pass issues a third of the three networks' convolution launches,
plus the two extra class-head convs per level (``conv_calls`` counts them; a test checks it), and the module is a
static graph: ``torch.export``/``torch.jit.trace``/ONNX export it as one program.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from effdet.efficientdet import FpnCombine

from ..sharing import Plan, Segment, segments, split_flat
from .base import CLASS_HEAD, Optimization, RawOutput, class_head_widths, on_device, register

STEM = "backbone.conv_stem"
# (conv, bn) attribute pairs where the BatchNorm directly follows the conv in the parent's forward
FOLD_PAIRS = {
    "EfficientNetFeatures": [("conv_stem", "bn1")],
    "DepthwiseSeparableConv": [("conv_dw", "bn1"), ("conv_pw", "bn2")],
    "InvertedResidual": [("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")],
    "SeparableConv2d": [("conv_pw", "bn")],
    "ConvBnAct2d": [("conv", "bn")],
}


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold each BatchNorm that directly follows a conv into that conv (eval-mode statistics)."""
    for module in list(net.modules()):
        for conv_name, bn_name in FOLD_PAIRS.get(type(module).__name__, []):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            folded = conv_like(
                conv,
                conv.weight * scale.reshape(-1, 1, 1, 1),
                (bias - bn.running_mean) * scale + bn.bias,
                conv.in_channels,
                conv.groups,
            )
            setattr(module, conv_name, folded)
            # BatchNormAct2d = BN + drop + act: keep what comes after the normalisation
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(module, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    return net


def conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, in_channels: int, groups: int):
    """A conv of ``conv``'s own class (e.g. timm's Conv2dSame, whose forward pads like TensorFlow: the
    ``tf_`` architectures) with new weights, input channels and groups; stride, padding, dilation kept."""
    new = copy.copy(conv)
    new._parameters, new._buffers, new._modules = {}, dict(conv._buffers), dict(conv._modules)
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
    new.in_channels, new.out_channels, new.groups = in_channels, weight.shape[0], groups
    return new


class MergedFpnCombine(nn.Module):
    """effdet's FpnCombine for M models at once: each model's fusion weights scale its channel group."""

    def __init__(self, parts: Sequence[FpnCombine], channels: int):
        super().__init__()
        first = parts[0]
        if first.weight_method not in ("fastattn", "attn", "sum"):
            raise ValueError(f"unsupported BiFPN weight method {first.weight_method}")
        self.inputs_offsets = list(first.inputs_offsets)
        self.weight_method = first.weight_method
        self.resample = first.resample  # already merged in place (its convs/BNs are replaced by the caller)
        weights = (
            torch.stack([p.edge_weights.detach() for p in parts])
            if first.edge_weights is not None
            else torch.ones(len(parts), len(self.inputs_offsets))
        )  # [M, inputs]
        # effdet normalises the fusion weights at every call; they are constants at inference, so
        # the per-channel factors are computed once (same float32 values as effdet's per-call ones)
        if self.weight_method == "fastattn":
            w = nn.functional.relu(weights)
            factors, denom = w, torch.sum(w, dim=1) + 0.0001
        elif self.weight_method == "attn":
            factors, denom = torch.softmax(weights, dim=1), torch.ones(len(parts))
        else:
            factors, denom = torch.ones_like(weights), torch.ones(len(parts))
        per_channel = lambda v: v.repeat_interleave(channels).reshape(1, -1, 1, 1)  # noqa: E731  [M] -> [1, M*C, 1, 1]
        self.register_buffer("factors", torch.stack([per_channel(factors[:, i]) for i in range(factors.shape[1])]))
        self.register_buffer("denom", per_channel(denom))

    def forward(self, x: list[torch.Tensor]):
        nodes = [resample(x[offset]) for offset, resample in zip(self.inputs_offsets, self.resample.values())]
        factors, denom = self.factors.to(nodes[0].dtype), self.denom.to(nodes[0].dtype)
        if self.weight_method == "fastattn":
            out = torch.stack([(nodes[i] * factors[i]) / denom for i in range(len(nodes))], dim=-1)
        else:
            out = torch.stack([nodes[i] * factors[i] for i in range(len(nodes))], dim=-1)
        return torch.sum(out, dim=-1)


class SplitPointwise(nn.Module):
    """The class head's last conv for M models: model k's own conv on its channel group, the outputs
    concatenated along channels (widths may differ, so no grouped conv without zero padding)."""

    def __init__(self, convs: Sequence[nn.Conv2d]):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.in_channels = convs[0].in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.in_channels
        return torch.cat([conv(x[:, k * c : (k + 1) * c]) for k, conv in enumerate(self.convs)], 1)


@torch.no_grad()
def merge_networks(nets: Sequence[nn.Module]) -> tuple[nn.Module, list[int]]:
    """The fused super-model; returns (module, class-head widths: the channels of each model's
    class output, concatenated in model order)."""
    nets = [fold_batchnorm(copy.deepcopy(n).eval()) for n in nets]
    widths = class_head_widths(nets)
    merged = copy.deepcopy(nets[widths.index(max(widths))])
    m = len(nets)
    for name, module in list(merged.named_modules()):
        parts = [n.get_submodule(name) for n in nets]
        if name == CLASS_HEAD:
            _replace(merged, name, SplitPointwise([copy.deepcopy(p) for p in parts]))
        elif isinstance(module, nn.Conv2d):
            weights = [p.weight for p in parts]
            biases = [p.bias for p in parts] if module.bias is not None else None
            shared_input = name == STEM
            conv = conv_like(
                module,
                torch.cat(weights),
                torch.cat(biases) if biases is not None else None,
                module.in_channels * (1 if shared_input else m),
                module.groups * (1 if shared_input else m),
            )
            _replace(merged, name, conv)
        elif isinstance(module, nn.BatchNorm2d):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                tensor = getattr(module, attr)
                new = torch.cat([getattr(p, attr).detach() for p in parts])
                if isinstance(tensor, nn.Parameter):
                    setattr(module, attr, nn.Parameter(new, requires_grad=False))
                else:
                    setattr(module, attr, new)
            module.num_features = module.num_features * m
    for name, module in list(merged.named_modules()):  # after the convs inside them were merged
        if isinstance(module, FpnCombine):
            _replace(
                merged,
                name,
                MergedFpnCombine(
                    [module] + [n.get_submodule(name) for n in nets[1:]], channels=merged.config.fpn_channels
                ),
            )
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval(), widths


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def conv_calls(module: nn.Module, x: torch.Tensor) -> int:
    """How many convolutions one forward pass launches (a forward hook on every Conv2d)."""
    count = [0]
    hooks = [
        m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        for m in module.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.inference_mode():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    return count[0]


def _replicate(state, m: int):
    """A shared state as the input of ``m`` stacked models: every tensor repeated along channels."""
    if isinstance(state, torch.Tensor):
        return torch.cat([state] * m, 1)
    if isinstance(state, tuple):  # the backbone's (x, features)
        return tuple(_replicate(s, m) if s is not None else None for s in state)
    return [_replicate(s, m) for s in state]


@dataclass(eq=False)
class _Stack:
    """Models whose own (unshared) parts start at the same segment of the same shared state: their networks
    merged, run from that segment on over the state repeated once per model."""

    models: list[int]
    widths: list[int]
    trunk: list[Segment]  # the merged network's trunk segments from the start (empty: the start is in a head)
    heads: list[tuple[int, list[Segment]]]  # (head index, its segments from the start)
    replicate: bool  # False at the root: the stem conv reads the one image for every model

    def run(self, state, outputs: list[list]) -> None:
        state = _replicate(state, len(self.models)) if self.replicate else state
        for segment in self.trunk:
            state = segment.run(state)
        for h, chain in self.heads:
            levels = state
            for segment in chain:
                levels = segment.run(levels)
            for j, k in enumerate(self.models):  # class outputs: each model's width; box outputs: equal parts
                if h == 0:
                    start = sum(self.widths[:j])
                    outputs[k][h] = [t[:, start : start + self.widths[j]] for t in levels]
                else:
                    part = levels[0].shape[1] // len(self.models)
                    outputs[k][h] = [t[:, j * part : (j + 1) * part] for t in levels]


def _index_of(chain: Sequence[Segment], name: str) -> int | None:
    return next((i for i, s in enumerate(chain) if s.name == name), None)


class StackedShared(nn.Module):
    """The set's networks as one module: what models share (``multidet.sharing.Plan``) computed once, and
    where models branch, their own parts stacked into one merged network (``merge_networks``) fed the shared
    state repeated per model. A set that shares nothing is today's grouped super-model; a set that shares
    all but the class heads computes one network and the class heads. ``forward`` gives every model's
    outputs flat (``sharing.split_flat``): a static graph for ONNX export."""

    def __init__(self, nets: Sequence[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.plan = Plan(list(nets))
        self.count = len(nets)
        self.stacks: dict[int, list[_Stack]] = {}  # id(node) -> the stacks that start below it
        self.stacked: set[int] = set()  # id(child) of every child a stack replaces
        merged_modules = []
        for node in [self.plan.root, *self.plan.nodes()]:
            own: dict[str, list] = {}  # the children of one model (its unshared rest), by first segment
            for child in node.children.values():
                if len(child.models) == 1:
                    own.setdefault(child.segment.name, []).append(child)
            for name, children in own.items():
                models = sorted(next(iter(c.models)) for c in children)
                if len(models) < 2:
                    continue
                merged, widths = merge_networks([nets[k] for k in models])
                merged_modules.append(merged)
                trunk, heads = segments(merged)
                chains = list(enumerate(heads.values()))
                start = _index_of(trunk, name)
                if start is None:  # the models' own parts start in a head: that head, from there
                    chains = [(h, chain[i:]) for h, chain in chains if (i := _index_of(chain, name)) is not None]
                    start = len(trunk)
                stack = _Stack(models, widths, trunk[start:], chains, node is not self.plan.root)
                self.stacks.setdefault(id(node), []).append(stack)
                self.stacked.update(id(c) for c in children)
        self.merged = nn.ModuleList(merged_modules)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs: list[list] = [[None, None] for _ in range(self.count)]
        self._visit(self.plan.root, x, outputs)
        flat: list[torch.Tensor] = []
        for cls_out, box_out in outputs:
            flat += list(cls_out) + list(box_out)
        return flat

    def _visit(self, node, state, outputs: list[list]) -> None:
        for k, h in node.ends:
            outputs[k][h] = state
        for stack in self.stacks.get(id(node), []):
            stack.run(state, outputs)
        for child in node.children.values():
            if id(child) not in self.stacked:
                self._visit(child, child.segment.run(state), outputs)


@register
class Grouped(Optimization):
    name = "grouped"
    auto_candidate = True
    # in eager PyTorch on a CPU, oneDNN's grouped convolutions were no faster than three plain ones (0.97x the
    # baseline on a 2-core EPYC, 2026-11-29): auto times it where it runs and keeps it only where it wins. Its
    # graph is what onnxruntime runs, where it is the fastest optimization. What the models share runs once
    # (StackedShared); only their own parts are stacked.

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        self.network = StackedShared([on_device(m.net, self.device).eval() for m in self.models])
        self.levels = self.models[0].net.config.num_levels

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        return split_flat(self.network(images), self.levels, active)
