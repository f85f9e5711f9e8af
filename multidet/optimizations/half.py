"""``fp16`` / ``bf16``: the baseline's networks under autocast in half precision.

Convolutions and matmuls run in the half type; autocast keeps numerically sensitive ops (and the
BatchNorm statistics) in fp32, and the outputs go back to fp32 for top-k/NMS (Optimization.detect). Reduced
tier: judged by its mAP drop against the baseline (multidet.quality), not by detection equality.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from ..device import native_bf16, native_fp16
from .base import RawOutput, register
from .baseline import Baseline


class Autocast(Baseline):
    dtype: ClassVar[torch.dtype]
    tier = "reduced"
    auto_candidate = True  # only when the user allows reduced precision
    raw_tolerance = None  # judged by mAP on trained weights, not by raw outputs

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        device = torch.device(device)
        if device.type == "cuda":
            return cls.dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
        if device.type == "mps":
            return cls.dtype == torch.float16
        return torch.amp.is_autocast_available("cpu")

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            return super().forward(images, active)


@register
class Fp16(Autocast):
    name = "fp16"
    dtype = torch.float16

    @classmethod
    def fast_on(cls, device: torch.device) -> bool:
        return torch.device(device).type != "cpu" or native_fp16()


@register
class Bf16(Autocast):
    name = "bf16"
    dtype = torch.bfloat16

    @classmethod
    def fast_on(cls, device: torch.device) -> bool:
        # without AMX / AVX-512 BF16 the CPU emulates bf16: 11.7 s a request against the baseline's 0.75 s,
        # measured on an AVX2-only EPYC with the trained weights
        return torch.device(device).type != "cpu" or native_bf16()
