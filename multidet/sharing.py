"""Shared work: the parts that models of a set have in common, found from their weights and computed once.

Users fine-tune several detectors from one start model and often keep a part of it frozen (the backbone;
the backbone and BiFPN; everything but the class head). Those parts are then the same function in every
model, and computing them once per image is exact: the same operations on the same input give the same
bits. Nothing is declared: each network is cut into its **segments** in the order its forward runs them
(backbone stem, each backbone stage, the BiFPN's extra levels, each BiFPN cell, then per head each
conv-BN-act repeat and the prediction layer), each segment is fingerprinted by its structure and the
content (sha256) of its weights and buffers, and models whose leading segments have equal fingerprints
share them: a prefix tree (``Plan``) whose nodes are computed once per image, branching where the models
differ. The class and box heads are two branches of one tree (they start from the same BiFPN output), so a
set fine-tuned only in its class heads computes one backbone, one BiFPN and one box net.

``hold_once`` does the same for memory: equal tensors of a set's networks become one tensor object, so a
shared part is held once however many models use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .weights import tensor_digest

State = object  # what flows between segments: (x, features) in the backbone, then a list of levels
Raw = tuple[list[torch.Tensor], list[torch.Tensor]]  # per level: class logits, box regressions
HEADS = ("class_net", "box_net")


@dataclass(frozen=True)
class Segment:
    """One step of a network's forward: what it reads (``modules``, whose weights fingerprint it) and how it
    turns the state before it into the state after it (never changing its input: a state may feed branches)."""

    name: str
    modules: tuple[nn.Module, ...]
    run: Callable[[State], State]


def fingerprint(segment: Segment, digests: dict[int, str] | None = None) -> str:
    """Equal for two segments exactly when they compute the same function: the same structure (module
    types and their settings, e.g. kernel sizes and the BiFPN's resampling sizes) and the same tensors.
    ``digests`` caches each tensor object's digest (``hold_once`` makes a set's equal tensors one object)."""
    digests = {} if digests is None else digests
    h = hashlib.sha256(segment.name.encode())
    for module in segment.modules:
        h.update(repr(module).encode())
        for name, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) not in digests:
                digests[id(tensor)] = tensor_digest(tensor)
            h.update(name.encode())
            h.update(digests[id(tensor)].encode())
    return h.hexdigest()


def _backbone_segments(backbone: nn.Module) -> list[Segment]:
    """timm's EfficientNetFeatures (every EfficientDet/EfficientDetV2 config) stage by stage; any other
    backbone is one segment."""
    stages = getattr(backbone, "_stage_out_idx", None)
    if type(backbone).__name__ != "EfficientNetFeatures" or backbone.feature_hooks is not None or stages is None:
        return [Segment("backbone", (backbone,), lambda x: (None, list(backbone(x))))]

    def stem(x):
        x = backbone.bn1(backbone.conv_stem(x))
        return x, [x] if 0 in stages else []

    def stage(i: int, block: nn.Module):
        def run(state):
            x, features = state
            x = block(x)
            return x, features + [x] if i + 1 in stages else features

        return run

    return [Segment("backbone.stem", (backbone.conv_stem, backbone.bn1), stem)] + [
        Segment(f"backbone.blocks.{i}", (block,), stage(i, block)) for i, block in enumerate(backbone.blocks)
    ]


def _fpn_segments(fpn: nn.Module) -> list[Segment]:
    def extra_levels(state):
        levels = list(state[1])
        for resample in fpn.resample.values():
            levels.append(resample(levels[-1]))
        return levels

    def cell(layer: nn.Module):
        return lambda levels: layer(list(levels))  # BiFpnLayer appends to the list it is given

    return [Segment("fpn.resample", (fpn.resample,), extra_levels)] + [
        Segment(f"fpn.cell.{i}", (layer,), cell(layer)) for i, layer in enumerate(fpn.cell)
    ]


def _head_segments(prefix: str, head: nn.Module) -> list[Segment]:
    """effdet's HeadNet one repeat at a time: repeat i is conv_rep[i], then that level's BatchNorm, then the
    activation, on every level (its loop over levels, turned inside out: each level's value is the same)."""

    def norms(i: int) -> list[nn.Module]:
        if head.bn_level_first:  # bn_rep[level][i]
            return [per_level[i] for per_level in head.bn_rep]
        return list(head.bn_rep[i])  # bn_rep[i][level]

    def repeat(i: int):
        conv, bns = head.conv_rep[i], norms(i)
        return lambda levels: [head.act(bns[level](conv(x))) for level, x in enumerate(levels)]

    def predict(levels):
        return [head.predict(x) for x in levels]

    reps = [
        Segment(f"{prefix}.rep.{i}", (head.conv_rep[i], *norms(i), head.act), repeat(i))
        for i in range(len(head.conv_rep))
    ]
    return reps + [Segment(f"{prefix}.predict", (head.predict,), predict)]


def segments(net: nn.Module) -> tuple[list[Segment], dict[str, list[Segment]]]:
    """An effdet EfficientDet's forward as (trunk segments, per head its segments): run in order, the trunk
    gives the BiFPN's levels and each head its per-level outputs, exactly as ``net(x)`` does."""
    trunk = _backbone_segments(net.backbone) + _fpn_segments(net.fpn)
    return trunk, {h: _head_segments(h, getattr(net, h)) for h in HEADS}


@dataclass(eq=False)
class Node:
    segment: Segment | None  # None: the root (the input image batch)
    children: dict[str, Node] = field(default_factory=dict)
    ends: list[tuple[int, int]] = field(default_factory=list)  # (model, head index) whose output this is
    models: set[int] = field(default_factory=set)  # models whose outputs need this node


class Plan:
    """The set's prefix tree of segments. ``run`` computes each node once for the models asked for."""

    def __init__(self, nets: Sequence[nn.Module]):
        self.root = Node(None)
        self.shared_with: list[dict[str, int]] = [{} for _ in nets]  # per model: segment -> first model computing it
        digests: dict[int, str] = {}  # per tensor object
        for k, net in enumerate(nets):
            trunk, heads = segments(net)
            for h, head in enumerate(heads.values()):
                node = self.root
                for segment in trunk + head:
                    key = fingerprint(segment, digests)
                    child = node.children.get(key)
                    if child is None:
                        child = node.children[key] = Node(segment)
                    elif k not in child.models and child.models:
                        self.shared_with[k][segment.name] = min(child.models)
                    child.models.add(k)
                    node = child
                node.ends.append((k, h))
        self.count = len(nets)

    def nodes(self) -> Iterable[Node]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    @property
    def computed(self) -> int:
        """Segments computed per image for the whole set (each shared node once)."""
        return sum(1 for _ in self.nodes())

    @property
    def total(self) -> int:
        """Segments the set's networks have together (what runs without sharing)."""
        return sum(len(n.models) for n in self.nodes())

    def run(self, x: torch.Tensor, active: Iterable[int] | None = None) -> dict[int, Raw]:
        wanted = set(range(self.count)) if active is None else set(active)
        outputs: dict[int, list] = {k: [None, None] for k in wanted}
        stack = [(child, x) for child in self.root.children.values() if child.models & wanted]
        while stack:  # depth first: a branch's states are freed before the next branch runs
            node, state = stack.pop()
            state = node.segment.run(state)
            for k, h in node.ends:
                if k in wanted:
                    outputs[k][h] = state
            stack.extend((child, state) for child in node.children.values() if child.models & wanted)
        return {k: (v[0], v[1]) for k, v in sorted(outputs.items())}

    def describe(self, names: Sequence[str]) -> dict:
        """For a log line and the benchmarks: segments computed against segments run without sharing, and
        what each model shares with an earlier one."""
        shares = {}
        for k, shared in enumerate(self.shared_with):
            if shared:
                first = sorted(set(shared.values()))
                shares[names[k]] = {"with": [names[j] for j in first], "segments": len(shared), "parts": _parts(shared)}
        return {"computed": self.computed, "without_sharing": self.total, "shares": shares}


def summary(described: dict) -> str:
    """``Plan.describe`` in one log line."""
    shares = "; ".join(
        f"{name} shares {', '.join(d['parts'])} with {', '.join(d['with'])}" for name, d in described["shares"].items()
    )
    return f"{described['computed']} of {described['without_sharing']} segments computed" + (
        f" ({shares})" if shares else " (nothing shared)"
    )


def _parts(shared: dict[str, int]) -> list[str]:
    """Segment names folded to the parts a person names: backbone, fpn, a whole head, or a head's repeats."""
    parts: list[str] = []
    for name in shared:
        part = name.split(".")[0]
        if part in HEADS and f"{part}.predict" not in shared:
            part = f"{part} (repeats)"
        if part not in parts:
            parts.append(part)
    return parts


class SharedNetwork(nn.Module):
    """Several networks of one architecture as one module whose shared segments run once (``Plan``).

    ``run(x, active)`` gives each active model's raw outputs; ``forward(x)`` every model's, flattened
    (model 0's five class levels and five box levels, then model 1's, ...): one static graph, so an export
    (ONNX, OpenVINO) holds each shared part once."""

    def __init__(self, nets: Sequence[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.plan = Plan(list(nets))

    def run(self, x: torch.Tensor, active: Iterable[int] | None = None) -> dict[int, Raw]:
        return self.plan.run(x, active)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        flat: list[torch.Tensor] = []
        for cls_out, box_out in self.plan.run(x).values():
            flat += list(cls_out) + list(box_out)
        return flat


def split_flat(outputs: Sequence, levels: int, active: Iterable[int]) -> dict[int, Raw]:
    """``SharedNetwork.forward``'s flat outputs (of any runtime) back to per-model (class, box) levels."""
    per = 2 * levels
    return {
        k: (list(outputs[k * per : k * per + levels]), list(outputs[k * per + levels : (k + 1) * per])) for k in active
    }


@torch.no_grad()
def hold_once(nets: Sequence[nn.Module]) -> int:
    """Make equal tensors of ``nets`` (same name, dtype, shape and content) one tensor object, the first
    model's: a part shared by the set is held once in memory. Returns the bytes freed."""
    first: dict[tuple[str, str], torch.Tensor] = {}
    freed = 0
    for net in nets:
        for module_name, module in net.named_modules():
            for table in (module._parameters, module._buffers):
                for attr, tensor in table.items():
                    if tensor is None:
                        continue
                    key = (f"{module_name}.{attr}", tensor_digest(tensor))
                    kept = first.setdefault(key, tensor)
                    if kept is not tensor:
                        table[attr] = kept
                        freed += tensor.numel() * tensor.element_size()
    return freed
