"""``vmap_backbone``: the three networks as ONE function over stacked weights.

The weights of the three models are stacked along a new leading dim (``torch.func.stack_module_state``
-style, done here by hand because one layer differs) and the network runs once under
``torch.func.vmap`` + ``functional_call``: every conv sees all three models' weights at once.
Only ``class_net.predict.conv_pw`` depends on ``num_classes`` (9 anchors x 90/7/20 = 810/63/180
output channels): it is zero-padded to the largest and each model's output sliced back, which
leaves each model's channels bit-for-bit what they were. BatchNorm stays in eval mode with the
stacked running statistics. Top-k/NMS stays outside vmap, per model, on the shared anchors.

On CPU this is slower than the loop (vmap turns convs into grouped convs plus extra elementwise
work); it pays where kernel launches dominate (GPUs), and it is what ``compile``/CUDA graphs build on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch.func import functional_call

from .base import CLASS_HEAD, Optimization, RawOutput, class_head_widths, pad_rows, register


def stack_weights(nets: Sequence[torch.nn.Module]) -> tuple[dict, dict, list[int]]:
    """Stacked params and buffers of same-architecture nets; the class head padded to the widest."""
    widths = class_head_widths(nets)
    stacked = []
    for source in (lambda n: n.named_parameters(), lambda n: n.named_buffers()):
        per_net = [dict(source(net)) for net in nets]
        out = {}
        for name in per_net[0]:
            tensors = [d[name].detach() for d in per_net]
            if name.startswith(CLASS_HEAD + "."):
                tensors = [pad_rows(t, max(widths)) for t in tensors]
            out[name] = torch.stack(tensors).contiguous()
        stacked.append(out)
    return stacked[0], stacked[1], widths


class StackedNetwork(torch.nn.Module):
    """Holds stacked weights as buffers (so .to() moves them and nothing is copied per call) and
    runs the vmapped network: [B,3,H,W] -> per level [M, B, C, h, w] class and box outputs."""

    def __init__(self, nets: Sequence[torch.nn.Module]):
        super().__init__()
        params, buffers, self.widths = stack_weights(nets)
        # The structure to call functionally: the net with the widest class head, its tensors on
        # "meta" (no data). Kept out of the module tree so .to(device) only moves the stacked weights.
        widest = nets[self.widths.index(max(self.widths))]
        self.__dict__["template"] = copy.deepcopy(widest).to("meta")
        self.names = {"p": list(params), "b": list(buffers)}
        for i, t in enumerate(list(params.values()) + list(buffers.values())):
            self.register_buffer(f"w{i}", t)
        self._fn = torch.vmap(self._single, in_dims=(0, 0, None))

    def _single(self, params, buffers, x):
        return functional_call(self.template, (params, buffers), (x,))

    def stacked(self) -> tuple[dict, dict]:
        tensors = [getattr(self, f"w{i}") for i in range(len(self.names["p"]) + len(self.names["b"]))]
        n = len(self.names["p"])
        return dict(zip(self.names["p"], tensors[:n])), dict(zip(self.names["b"], tensors[n:]))

    def forward(self, x: torch.Tensor):
        params, buffers = self.stacked()
        return self._fn(params, buffers, x)


@register
class VmapBackbone(Optimization):
    name = "vmap_backbone"
    # 0.36x the baseline on a 2-core EPYC (docs/benchmarks.md): auto times it and keeps it only where it wins
    auto_candidate = True

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        self.network = StackedNetwork([m.net.eval() for m in self.models]).to(self.device).eval()

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        cls_out, box_out = self.network(images)
        widths = self.network.widths
        return {k: ([c[k, :, : widths[k]] for c in cls_out], [b[k] for b in box_out]) for k in active}
