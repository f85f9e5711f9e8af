"""The one timing loop: configurations interleaved call by call, so a noisy moment hits all alike.

Used by ``auto`` at load and by every experiment (benchmark, ablation, overhead, peers, scaling).
Round r calls every configuration once, starting with the (r mod n)-th so none always goes first;
``pause_s`` between calls lets runtimes whose worker threads spin after a call (ONNX Runtime,
OpenVINO) go idle before the next configuration is timed; ``sync`` (e.g. a CUDA synchronize) runs
before each clock read. Warm-up calls are made first and not timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timings:
    ms: dict[str, list[float]]  # per configuration, one figure per round
    results: dict[str, list[Any]] = field(default_factory=dict)  # what each call returned (keep_results)


def interleaved(
    calls: Mapping[str, Callable[[int], Any]],
    rounds: int,
    *,
    warmup: int = 0,
    pause_s: float = 0.0,
    sync: Callable[[], None] | None = None,
    keep_results: bool = False,
    progress: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> Timings:
    """Milliseconds of ``calls[name](i)`` for i in 0..rounds-1, interleaved round by round."""
    names = list(calls)
    for i in range(warmup):
        for name in names:
            calls[name](i)
    out = Timings({n: [] for n in names}, {n: [] for n in names} if keep_results else {})
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if pause_s:
                time.sleep(pause_s)
            if sync:
                sync()
            t0 = time.perf_counter()
            result = calls[name](r)
            if sync:
                sync()
            out.ms[name].append((time.perf_counter() - t0) * 1e3)
            if keep_results:
                out.results[name].append(result)
        if progress:
            progress(r + 1, out.ms)
    return out
