"""``channels_last``: the baseline with weights and input in NHWC memory format (oneDNN/cuDNN
pick NHWC kernels); same arithmetic, another memory layout."""
from __future__ import annotations

from typing import Sequence

import torch

from .base import RawOutput, register
from .baseline import BaselineRunner


@register
class ChannelsLastRunner(BaselineRunner):
    name = "channels_last"

    def __init__(self, models, device, max_detections=100):
        super().__init__(models, device, max_detections)
        self.nets = [net.to(memory_format=torch.channels_last) for net in self.nets]

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        return super().forward(images.contiguous(memory_format=torch.channels_last), active)
