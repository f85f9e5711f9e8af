"""``baseline``: the three networks one after another, eager fp32, as effdet's DetBenchPredict."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Optimization, RawOutput, on_device, register


@register
class Baseline(Optimization):
    name = "baseline"
    auto_candidate = True
    separable = True

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        self.nets = [on_device(m.net, self.device).eval() for m in self.models]

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        return {i: self.nets[i](images) for i in active}
