"""Measurements, one module each, every one a function that returns a ``Result``:

- ``benchmark``: latency, throughput and where the time goes per path and device (core package);
- ``ablation``: every optimization's latency against the baseline's and its answer's quality (mAP, tier rule);
- ``overhead``: what serving adds: the core package vs the TorchServe handler vs TorchServe over HTTP;
- ``scaling``: how a request's cost grows with the number of models in the set;
- ``peers``: the served optimization against ONNX Runtime and OpenVINO running the same networks alone;
- ``sweep``: latency and throughput under load (concurrent users) against a real TorchServe;
- ``soak``: a long mixed good/bad load, its windows, memory and worker restarts.

The rules each follows (``detlab.bench``): warm-up excluded, the device synchronised around each
clock read, the same photos for every configuration, configurations interleaved by the one timing loop
(``multidet.timing.interleaved``), the environment recorded. The command lines (``scripts/run_*.py``)
only parse arguments, resolve the checkout's paths and call these; tests call them in-process.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from .. import mock  # noqa: F401  (registers the lower bound the benchmarks measure)
from ..bench import write_outputs

Say = Callable[[str], None]


def say_flush(message: str) -> None:
    print(message, flush=True)


def shown(path: Path) -> str:
    """``path`` as a report shows it: relative to the current directory when it is under it."""
    path = Path(path).resolve()
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


class Result(ABC):
    """What one run measured (``to_json``: its JSON, by default ``data``), its text report and, where
    a picture says more than the table, its PNG."""

    stem: ClassVar[str]

    def __init__(self, data: dict):
        self.data = data

    def to_json(self) -> dict:
        return self.data

    @abstractmethod
    def report(self) -> str: ...

    def plot(self, png: Path) -> Path | None:
        """Draw ``png``; None where this experiment has no picture."""
        return None

    def write(self, out: Path) -> Path:
        """``<stem>_results.json``, ``<stem>_report.txt`` (printed too), ``<stem>.png`` where it has one."""
        write_outputs(out, self.stem, self.to_json(), self.report())
        if self.plot(out / f"{self.stem}.png"):
            print(f"written: {out}/{self.stem}.png", flush=True)
        return out / f"{self.stem}_results.json"
