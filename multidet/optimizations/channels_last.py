"""``channels_last``: the baseline with weights and input in NHWC memory format (oneDNN/cuDNN
pick NHWC kernels); same arithmetic, another memory layout."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from .base import RawOutput, register
from .baseline import Baseline


@register
class ChannelsLast(Baseline):
    name = "channels_last"
    auto_candidate = True

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        # a copy: Module.to(memory_format) works in place, and the loaded nets are shared with other optimizations
        # (one deepcopy of the list keeps the tensors the networks share shared; Module.to converts them in place)
        self.nets = [net.to(memory_format=torch.channels_last) for net in copy.deepcopy(self.nets)]

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        return super().forward(images.contiguous(memory_format=torch.channels_last), active)
