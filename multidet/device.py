"""Device choice, clock-safe synchronisation, and the process's allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

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


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux; empty elsewhere), read once."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split())
    except OSError:
        return frozenset()


def native_bf16() -> bool:
    """Whether this CPU has bf16 matrix units or instructions (AMX / AVX-512 BF16)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def native_fp16() -> bool:
    """Whether this CPU has fp16 matrix units (AMX-FP16); without them PyTorch's fp16 convolutions on a CPU
    are emulated (measured 4.3 s a request against the baseline's 0.2-0.6 s, docs/benchmarks.md)."""
    return "amx_fp16" in cpu_flags()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so a wall-clock reading covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HELD_BYTES = 1 << 30


@functools.cache
def hold_freed_memory() -> bool:
    """Keep the memory of freed tensors in this process for the next request (glibc's malloc; once per process).

    By default glibc serves a block over its mmap threshold (128 KiB, growing to 32 MiB) with a fresh mapping and
    gives it back when freed, and trims the heap's free top: a request's activations come back as new, zeroed pages
    at every request (page faults on every layer). With both thresholds at 1 GiB they stay in the heap and are used
    again. Measured (docs/benchmarks.md 2c, 2-core Xeon): the eager baseline 110 -> 96 ms an image, a batch of 4
    460 -> 330 ms; channels_last 89 -> 76; ONNX Runtime (its own arena) unchanged. The process keeps its peak: what
    one request of the largest batch needs. False where the C library is not glibc (macOS, musl): nothing changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HELD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, HELD_BYTES))
