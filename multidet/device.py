"""Device choice and clock-safe synchronisation."""

from __future__ import annotations

import torch


def select_device(preference: str = "auto", gpu_id: int | str | None = None) -> torch.device:
    """``auto``: cuda:{gpu_id} (TorchServe's assignment) if CUDA is available, else MPS, else CPU."""
    pref = (preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(gpu_id) if gpu_id is not None else 0}")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {pref!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{int(gpu_id) if gpu_id is not None else 0}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' requested but MPS is not available")
    return device


def native_bf16() -> bool:
    """Whether this CPU has bf16 matrix units or instructions (AMX / AVX-512 BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so a wall-clock reading covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
