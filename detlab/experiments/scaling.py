"""How a request's cost grows with the number of models in the set, per path.

Sets of 1..N models are made from a base set by cycling through its models (model k of a set of n is
base model k mod len(base), named ``m<k>``): copies of the same weights cost what distinct ones do.
In-process, every (path, n) is a Detector timed on the same photos, all of them interleaved in one
loop (``timing.interleaved``); over HTTP, each (path, n) is a real TorchServe serving that set
(started one after another; each timed alone on the same photos, the baseline of that n first).
``run`` returns a ``ScalingResult``; ``scripts/run_scaling.py`` is the command line (``make scaling``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from multidet.config import Settings
from multidet.device import synchronize
from multidet.modelset import ModelSet
from multidet.optimizations import build_optimization
from multidet.pipeline import Detector
from multidet.timing import interleaved
from multidet.weights import LoadedModel

from .. import build
from . import Result, Say, say_flush


@dataclass
class ScalingResult(Result):
    stem: ClassVar[str] = "scaling"
    sizes: list[int]
    paths: list[str]
    requests: int
    in_process_p50: dict[str, dict[int, float]] = field(default_factory=dict)  # path -> n -> ms
    http_p50: dict[str, dict[int, float]] = field(default_factory=dict)
    environment: dict = field(default_factory=dict)

    def per_model(self, table: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
        return {p: {n: round(ms / n, 1) for n, ms in row.items()} for p, row in table.items()}

    def to_json(self) -> dict:
        out = asdict(self)
        out["in_process_ms_per_model"] = self.per_model(self.in_process_p50)
        return out

    def report(self) -> str:
        return report(self)

    def plot(self, png: Path) -> Path:
        return plot(self, png)


def cycled(models: Sequence[LoadedModel], n: int) -> list[LoadedModel]:
    """A set of ``n`` models: base model k mod len(models) as ``m<k>`` (the network shared, never moved)."""
    return [replace(models[k % len(models)], name=f"m{k}") for k in range(n)]


def cycled_set(model_set: ModelSet, n: int) -> ModelSet:
    """The same as a model set file's entries (for a model archive): entries may share a weights file."""
    entries = model_set.entries
    return ModelSet(tuple(replace(entries[k % len(entries)], name=f"m{k}") for k in range(n)))


def run_in_process(
    base: Sequence[LoadedModel],
    sizes: Sequence[int],
    paths: Sequence[str],
    bodies: Sequence[bytes],
    requests: int,
    work: Path,
    calibration_photos: Path | None = None,
    say: Say = say_flush,
) -> dict[str, dict[int, float]]:
    device = torch.device("cpu")
    detectors: dict[tuple[str, int], Detector] = {}
    for n in sizes:
        models = cycled(base, n)
        for path in paths:
            t0 = time.perf_counter()
            artifacts = work / f"{path}-{n}"
            build_optimization(path, models, artifacts, build.context(photos=calibration_photos, log=lambda _: None))
            detectors[(path, n)] = Detector(models, Settings(optimization=path), device, artifacts)
            say(f"{path} x{n}: built and loaded in {time.perf_counter() - t0:.0f} s")
    calls = {f"{p}|{n}": (lambda i, d=d: d.predict_one(bodies[i % len(bodies)])) for (p, n), d in detectors.items()}

    def progress(done: int, times: dict) -> None:
        if done % max(1, requests // 4) == 0 or done == requests:
            say(f"in-process {done}/{requests} rounds")

    times = interleaved(calls, requests, warmup=1, sync=lambda: synchronize(device), progress=progress).ms
    out: dict[str, dict[int, float]] = {p: {} for p in paths}
    for key, ms in times.items():
        p, n = key.split("|")
        out[p][int(n)] = round(statistics.median(ms), 1)
    return out


def run_http(
    model_set: ModelSet,
    sizes: Sequence[int],
    paths: Sequence[str],
    bodies: Sequence[bytes],
    requests: int,
    start: Callable,  # (workdir, model set file, path) -> a started detlab.server.TorchServe
    say: Say = say_flush,
) -> dict[str, dict[int, float]]:
    import requests as http_client

    out: dict[str, dict[int, float]] = {p: {} for p in paths}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"scaling-{n}-") as tmp:
            set_file = cycled_set(model_set, n).write(Path(tmp) / "models.yaml")
            for path in paths:
                with start(Path(tmp) / path, set_file, path) as server, http_client.Session() as s:
                    url = f"{server.inference}/predictions/all"

                    def call(i: int, url=url, what=f"{path} x{n}") -> None:
                        r = s.put(url, data=bodies[i % len(bodies)], timeout=300)
                        if r.status_code != 200:
                            raise RuntimeError(f"{what}: HTTP {r.status_code}: {r.text[:200]}")

                    ms = interleaved({path: call}, requests, warmup=2).ms[path]
                out[path][n] = round(statistics.median(ms), 1)
                say(f"HTTP {path} x{n}: p50 {out[path][n]:.0f} ms")
    return out


def report(result: ScalingResult) -> str:
    lines = [
        f"Cost of a request vs the number of models (p50 ms over {result.requests} requests; "
        f"{result.environment.get('cpu', '')}, {result.environment.get('cpu_cores', '')} cores)",
        "",
    ]
    for title, table in (("in-process", result.in_process_p50), ("over HTTP (TorchServe)", result.http_p50)):
        if not table:
            continue
        lines.append(f"{title}:")
        lines.append(
            "  path".ljust(26) + "".join(f"{n:>9}" for n in result.sizes) + "   ms/model at max  growth 1->max"
        )
        for path, row in table.items():
            cells = "".join(f"{row[n]:>9.0f}" if n in row else " " * 9 for n in result.sizes)
            hi, lo = row.get(max(result.sizes)), row.get(min(result.sizes))
            tail = f"   {hi / max(result.sizes):>8.0f}  {hi / lo:>6.2f}x" if hi and lo else ""
            lines.append(f"  {path:<24}{cells}{tail}")
        base = table.get("baseline", {})
        if base:
            lines.append("  speed-up vs baseline at each size:")
            for path, row in table.items():
                if path != "baseline":
                    ratios = "".join(
                        f"{base[n] / row[n]:>9.2f}" if n in row and n in base else " " * 9 for n in result.sizes
                    )
                    lines.append(f"    {path:<22}{ratios}")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: ScalingResult, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, d) for t, d in (("in-process", result.in_process_p50), ("HTTP", result.http_p50)) if d]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (title, table) in zip(axes[0], panels):
        for path, row in table.items():
            ns = sorted(row)
            ax.plot(ns, [row[n] for n in ns], marker="o", label=path)
        ax.set_xlabel("models in the set")
        ax.set_ylabel("p50 latency per request (ms)")
        ax.set_xticks(result.sizes)
        ax.set_title(f"{title}: latency vs number of models")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(result.environment.get("cpu", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def run(
    model_set: ModelSet,
    sizes: Sequence[int],
    paths: Sequence[str],
    photo_dir: Path,
    requests: int = 10,
    http_paths: Sequence[str] = (),
    start: Callable | None = None,  # for HTTP: (workdir, model set file, path) -> a started TorchServe
    say: Say = say_flush,
) -> ScalingResult:
    """In-process for ``paths`` and, with ``start``, over HTTP for ``http_paths``, at each of ``sizes``."""
    from multidet.modelset import load_models

    from ..bench import environment, photos

    bodies = list(photos(photo_dir).values())
    result = ScalingResult(list(sizes), list(paths), requests, environment=environment())
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        result.in_process_p50 = run_in_process(
            load_models(model_set), sizes, paths, bodies, requests, Path(tmp), photo_dir, say
        )
    if start is not None and http_paths:
        result.http_p50 = run_http(model_set, sizes, http_paths, bodies, requests, start, say)
    return result
