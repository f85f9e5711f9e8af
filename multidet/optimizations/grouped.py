"""``grouped``: one fused super-model for the three networks.

Built once at load time from the three same-architecture networks:

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

One forward pass issues a third of the three networks' convolution launches, plus the two extra
class-head convs per level (``conv_calls`` counts them; a test checks it), and the module is a
static graph: ``torch.export``/``torch.jit.trace``/ONNX export it as one program.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
from effdet.efficientdet import FpnCombine

from .base import CLASS_HEAD, Optimization, RawOutput, class_head_widths, register

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


def split_outputs(cls_out, box_out, widths: Sequence[int], active: Sequence[int]) -> dict[int, RawOutput]:
    box = box_out[0].shape[1] // len(widths)  # 9 anchors x 4 coordinates per model
    starts = [sum(widths[:k]) for k in range(len(widths))]
    return {
        k: (
            [c[:, starts[k] : starts[k] + widths[k]] for c in cls_out],
            [b[:, k * box : (k + 1) * box] for b in box_out],
        )
        for k in active
    }


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


@register
class Grouped(Optimization):
    name = "grouped"
    auto_candidate = True
    # in eager PyTorch on a CPU, oneDNN's grouped convolutions were no faster than three plain ones (0.97x the
    # baseline on a 2-core EPYC, 2026-11-29): auto times it where it runs and keeps it only where it wins. Its
    # graph is what onnxruntime runs, where it is the fastest optimization.

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        merged, self.widths = merge_networks([m.net for m in self.models])
        self.network = merged.to(self.device)

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        cls_out, box_out = self.network(images)
        return split_outputs(cls_out, box_out, self.widths, active)
