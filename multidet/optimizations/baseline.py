"""``baseline``: the set's networks in eager fp32, as effdet's DetBenchPredict runs each, the parts that models share
computed once (``multidet.sharing``: found from the weights; bit-identical to running each network alone)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch

from ..sharing import SharedNetwork
from .base import Optimization, RawOutput, on_device, register


@register
class Baseline(Optimization):
    name = "baseline"
    auto_candidate = True
    separable = True

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        self.nets = [on_device(m.net, self.device).eval() for m in self.models]

    @cached_property
    def network(self) -> SharedNetwork:
        """``nets`` as one module whose shared parts run once; made at first use, from the nets a subclass left
        (channels_last's copies; never for the ones that run each network whole: ``forward_each``)."""
        return SharedNetwork(self.nets)

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        return self.network.run(images, active)

    def forward_each(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        """Each network whole (for the optimizations that make every network one compiled program)."""
        return {i: self.nets[i](images) for i in active}
