"""How a request's cost grows with the number of models in the set, per path and per kind of set.

A set of n models is made from the base set's first model the way users make related detectors: model 0 is
that model, model k its copy with the parts a fine-tune would change made its own (their float tensors scaled
by 1 + k/1000: other content, nearly the same answers, so post-processing costs what it does for the base), the
rest bit for bit the same. Three kinds of set (``SHARING``): models sharing all but their class nets, sharing
only their backbone, and sharing nothing. What a shared part costs is then what the service does with it
(``multidet.sharing``: computed once), not an assumption. In-process, every (kind, path, n) is a Detector timed on
the same photos, all interleaved in one loop (``timing.interleaved``); over HTTP, each is a real TorchServe
serving that set (started one after another, each timed alone on the same photos). ``run`` returns a
``ScalingResult``; ``scripts/run_scaling.py`` is the command line (``make scaling``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from multidet.config import Settings
from multidet.device import synchronize
from multidet.modelset import ModelEntry, ModelSet
from multidet.optimizations import build_optimization
from multidet.pipeline import Detector
from multidet.sharing import hold_once
from multidet.timing import interleaved
from multidet.weights import LoadedModel, check_architecture

from .. import build
from ..checkpoints import perturbed, save_checkpoint
from . import Result, Say, say_flush

# kind of set -> the key prefixes each added model has of its own
SHARING = {
    "all_but_class_net": ("class_net.",),
    "backbone_only": ("fpn.", "class_net.", "box_net."),
    "nothing": ("",),
}
Table = dict[str, dict[str, dict[int, float]]]  # kind -> path -> n -> p50 ms


@dataclass
class ScalingResult(Result):
    stem: ClassVar[str] = "scaling"
    sizes: list[int]
    paths: list[str]
    requests: int
    in_process_p50: Table = field(default_factory=dict)
    http_p50: Table = field(default_factory=dict)
    environment: dict = field(default_factory=dict)

    @staticmethod
    def added_cost(row: dict[int, float]) -> dict[int, float]:
        """Per n > 1: what each model after the first costs, as a share of the first model's p50."""
        one = row.get(1)
        return {n: round((ms - one) / (n - 1) / one, 3) for n, ms in row.items() if one and n > 1}

    def to_json(self) -> dict:
        out = asdict(self)
        out["in_process_added_model_cost"] = {
            kind: {p: self.added_cost(row) for p, row in paths.items()} for kind, paths in self.in_process_p50.items()
        }
        out["http_added_model_cost"] = {
            kind: {p: self.added_cost(row) for p, row in paths.items()} for kind, paths in self.http_p50.items()
        }
        return out

    def report(self) -> str:
        return report(self)

    def plot(self, png: Path) -> Path:
        return plot(self, png)


def derived(base: LoadedModel, n: int, own: Sequence[str]) -> list[LoadedModel]:
    """A set of ``n`` models from ``base`` (``m0`` = base): model k has the parts under ``own`` of its own; the
    equal tensors are held once, as a loaded set holds them (``sharing.hold_once``)."""
    state = base.net.state_dict()
    models = [LoadedModel(name="m0", class_names=base.class_names, net=base.net)]
    for k in range(1, n):
        net = check_architecture(perturbed(state, own, 1 + k / 1000), base.architecture, base.num_classes)
        models.append(LoadedModel(name=f"m{k}", class_names=base.class_names, net=net))
    hold_once([m.net for m in models])
    return models


def write_set(models: Sequence[LoadedModel], folder: Path) -> Path:
    """``models`` as weights files and a model set file in ``folder`` (for a server)."""
    entries = []
    for m in models:
        state = m.net.state_dict()
        save_checkpoint(folder, m.name, m.architecture, m.class_names, state, seed=None, source="scaling")
        entries.append(ModelEntry(m.name, m.architecture, (folder / f"{m.name}.pth").resolve()))
    return ModelSet(tuple(entries)).write(folder / "models.yaml")


def run_in_process(
    base: LoadedModel,
    kinds: Sequence[str],
    sizes: Sequence[int],
    paths: Sequence[str],
    bodies: Sequence[bytes],
    requests: int,
    work: Path,
    calibration_photos: Path | None = None,
    say: Say = say_flush,
) -> Table:
    device = torch.device("cpu")
    detectors: dict[tuple[str, str, int], Detector] = {}
    for kind in kinds:
        for n in sizes:
            models = derived(base, n, SHARING[kind])
            for path in paths:
                t0 = time.perf_counter()
                artifacts = work / f"{kind}-{path}-{n}"
                context = build.context(photos=calibration_photos, log=lambda _: None)
                build_optimization(path, models, artifacts, context)
                detectors[(kind, path, n)] = Detector(models, Settings(optimization=path), device, artifacts)
                say(f"{kind} {path} x{n}: built and loaded in {time.perf_counter() - t0:.0f} s")
    calls = {
        "|".join(map(str, key)): (lambda i, d=d: d.predict_one(bodies[i % len(bodies)])) for key, d in detectors.items()
    }

    def progress(done: int, times: dict) -> None:
        if done % max(1, requests // 4) == 0 or done == requests:
            say(f"in-process {done}/{requests} rounds")

    times = interleaved(calls, requests, warmup=1, sync=lambda: synchronize(device), progress=progress).ms
    out: Table = {kind: {p: {} for p in paths} for kind in kinds}
    for key, ms in times.items():
        kind, p, n = key.split("|")
        out[kind][p][int(n)] = round(statistics.median(ms), 1)
    return out


def run_http(
    base: LoadedModel,
    kinds: Sequence[str],
    sizes: Sequence[int],
    paths: Sequence[str],
    bodies: Sequence[bytes],
    requests: int,
    start: Callable,  # (workdir, model set file, path) -> a started detlab.server.TorchServe
    say: Say = say_flush,
) -> Table:
    import requests as http_client

    out: Table = {kind: {p: {} for p in paths} for kind in kinds}
    for kind in kinds:
        for n in sizes:
            with tempfile.TemporaryDirectory(prefix=f"scaling-{kind}-{n}-") as tmp:
                set_file = write_set(derived(base, n, SHARING[kind]), Path(tmp) / "set")
                for path in paths:
                    with start(Path(tmp) / path, set_file, path) as server, http_client.Session() as s:
                        url = f"{server.inference}/predictions/all"

                        def call(i: int, url=url, what=f"{kind} {path} x{n}") -> None:
                            r = s.put(url, data=bodies[i % len(bodies)], timeout=300)
                            if r.status_code != 200:
                                raise RuntimeError(f"{what}: HTTP {r.status_code}: {r.text[:200]}")

                        ms = interleaved({path: call}, requests, warmup=2).ms[path]
                    out[kind][path][n] = round(statistics.median(ms), 1)
                    say(f"HTTP {kind} {path} x{n}: p50 {out[kind][path][n]:.0f} ms")
    return out


def report(result: ScalingResult) -> str:
    lines = [
        f"Cost of a request vs the number of models (p50 ms over {result.requests} requests; "
        f"{result.environment.get('cpu', '')}, {result.environment.get('cpu_cores', '')} cores)",
        "",
    ]
    for title, tables in (("in-process", result.in_process_p50), ("over HTTP (TorchServe)", result.http_p50)):
        for kind, table in tables.items():
            lines.append(f"{title}, models sharing {kind.replace('_', ' ')}:")
            lines.append("  path".ljust(26) + "".join(f"{n:>9}" for n in result.sizes) + "   added model / first")
            for path, row in table.items():
                cells = "".join(f"{row[n]:>9.0f}" if n in row else " " * 9 for n in result.sizes)
                added = result.added_cost(row).get(max(result.sizes))
                lines.append(f"  {path:<24}{cells}" + (f"   {added:>8.2f}" if added is not None else ""))
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: ScalingResult, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result.in_process_p50 or result.http_p50)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for where, tables, style in (("", result.in_process_p50, "-"), (" HTTP", result.http_p50, "--")):
            for path, row in tables.get(kind, {}).items():
                ns = sorted(row)
                ax.plot(ns, [row[n] for n in ns], style, marker="o", label=path + where)
        ax.set_xlabel("models in the set")
        ax.set_ylabel("p50 latency per request (ms)")
        ax.set_xticks(result.sizes)
        ax.set_title(f"sharing {kind.replace('_', ' ')}")
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
    kinds: Sequence[str] = tuple(SHARING),
    http_sizes: Sequence[int] | None = None,  # default: ``sizes``
    say: Say = say_flush,
) -> ScalingResult:
    """In-process for ``paths`` and, with ``start``, over HTTP for ``http_paths``: each kind of set at each size,
    made from the first model of ``model_set``."""
    from multidet.modelset import load_models

    from ..bench import environment, photos

    bodies = list(photos(photo_dir).values())
    base = load_models(model_set)[0]
    result = ScalingResult(list(sizes), list(paths), requests, environment=environment())
    if paths:
        with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
            work = Path(tmp)
            result.in_process_p50 = run_in_process(base, kinds, sizes, paths, bodies, requests, work, photo_dir, say)
    if start is not None and http_paths:
        result.http_p50 = run_http(base, kinds, http_sizes or sizes, http_paths, bodies, requests, start, say)
    return result
