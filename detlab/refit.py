"""A user's way to a shared set: models 2..N of a set of separately fine-tuned detectors refitted onto model 1's
trunk, with what that costs and saves, measured.

Each model k >= 2 starts from its own weights with the part ``freeze`` names (backbone; backbone + BiFPN; all but
the class net) replaced by model 1's, keeps that part frozen (bit for bit model 1's) and fine-tunes the rest on
its own COCO-format data (``DATA/train``, ``DATA/val``). The service then computes the common part once per image
(``multidet.sharing``). Reported, before and after: each model's mAP on its val split, the set's latency served
in-process (decode to JSON, one timing loop, both sets interleaved in one run) and how many network segments
run per image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from multidet.config import Settings
from multidet.modelset import ModelEntry, ModelSet, read_model_set
from multidet.optimizations import build_optimization
from multidet.pipeline import Detector
from multidet.timing import interleaved

from . import build
from .bench import environment, summarize
from .evaluation import evaluate
from .training import FROZEN, TrainConfig, train

Say = Callable[[str], None]


@dataclass
class RefitResult:
    trunk: str  # model 1
    freeze: str
    set_file: str  # the refitted set (serve it with MODELS=...)
    models: dict[str, dict] = field(default_factory=dict)  # name -> {before, after: mAP summaries, steps, start}
    latency_ms: dict[str, dict] = field(default_factory=dict)  # "before" / "after" -> summarize(...)
    segments: dict[str, dict] = field(default_factory=dict)  # "before" / "after" -> sharing per architecture
    optimization: str = "baseline"
    environment: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        lines = [
            f"models 2..N refitted onto {self.trunk}'s {self.freeze.replace('_', ' ')} (frozen, shared):",
            "| model | mAP@0.5 before | after | mAP@[.5:.95] before | after |",
            "|---|---|---|---|---|",
        ]
        for name, m in self.models.items():
            b, a = m["before"], m["after"]
            lines.append(f"| {name} | {b['map50']:.3f} | {a['map50']:.3f} | {b['map']:.3f} | {a['map']:.3f} |")
        b, a = self.latency_ms["before"]["p50"], self.latency_ms["after"]["p50"]
        lines.append(
            f"set latency p50 ({self.optimization}, in-process, one image): {b:.1f} -> {a:.1f} ms ({a / b:.2f}x); "
            + "; ".join(
                f"{when}: {sum(d['computed'] for d in s.values())} of {sum(d['without_sharing'] for d in s.values())} "
                "segments computed"
                for when, s in self.segments.items()
            )
        )
        return "\n".join(lines)


def refit(
    model_set: ModelSet | Path,
    data: Mapping[str, Path],
    out: Path,
    bodies: list[bytes],
    freeze: str = "all_but_class_net",
    train_fields: Mapping | None = None,
    optimization: str = "baseline",
    requests: int = 10,
    device: str = "cpu",
    photos: Path | None = None,
    progress=None,
    say: Say = print,
) -> RefitResult:
    """Refit every model of ``model_set`` but the first onto the first's ``freeze`` part, each on ``data[name]``
    (``train/`` and ``val/`` COCO folders; a model without data is left as it is, its mAP not measured), in
    ``out/<name>`` (resumable); writes ``out/models.yaml`` (model 1 as it was, the others refitted) and returns
    the measurements. ``bodies``: the images the latency is timed on; ``photos``: an optimization's calibration
    images, where its build step takes some (as ``make mar``)."""
    if freeze not in FROZEN or freeze == "none":
        raise ValueError(f"freeze must be one of {sorted(set(FROZEN) - {'none'})}, got {freeze!r}")
    model_set = model_set if isinstance(model_set, ModelSet) else read_model_set(model_set)
    trunk, others = model_set.names[0], model_set.names[1:]
    unknown = sorted(set(data) - set(others))
    if unknown:
        raise ValueError(f"data for {unknown}: only models 2..N of {list(model_set.names)} are refitted")
    out = Path(out)
    result = RefitResult(trunk, freeze, str(out / "models.yaml"), optimization=optimization, environment=environment())
    for name, folder in data.items():
        result.models[name] = {"before": score(model_set, name, Path(folder) / "val")}
        say(f"{name} before: mAP@0.5 {result.models[name]['before']['map50']:.3f}")
    entries = []
    for entry in model_set:
        if entry.name not in data:
            entries.append(dataclasses.replace(entry, weights=Path(entry.weights).resolve()))
            continue
        folder = Path(data[entry.name])
        cfg = TrainConfig(
            model=entry.name,
            class_names=entry.class_names,
            architecture=entry.architecture,
            train_dir=folder / "train",
            val_dir=folder / "val",
            out_dir=out / entry.name,
            init=model_set.source,
            init_model=entry.name,
            trunk_model=trunk,
            freeze=freeze,
            **dict(train_fields or {}),
        )
        say(f"refitting {entry.name} onto {trunk}'s {freeze} ({cfg.steps} steps)")
        meta = train(cfg, progress).meta
        result.models[entry.name].update(
            after=meta.training["val"], steps=meta.training["steps"], start=meta.training["start"]
        )
        entries.append(ModelEntry(entry.name, entry.architecture, (out / entry.name / meta.weights_file).resolve()))
    refitted = ModelSet(tuple(entries)).write(out / "models.yaml")
    detectors = {}
    for when, s in (("before", model_set), ("after", refitted)):
        artifacts = out / "artifacts" / when
        if optimization != "baseline":  # its build step, as `make mar` runs it
            models = Detector.from_model_set(s, Settings(), torch.device("cpu")).models
            build_optimization(optimization, models, artifacts, build.context(photos=photos))
        detectors[when] = Detector.from_model_set(
            s, Settings(optimization=optimization), torch.device(device), artifacts
        )
    for when, detector in detectors.items():
        result.segments[when] = detector.sharing
    timings = interleaved(
        {when: (lambda i, d=d: d.predict_one(bodies[i % len(bodies)])) for when, d in detectors.items()},
        requests,
        warmup=2,
    )
    result.latency_ms = {when: summarize(ms) for when, ms in timings.ms.items()}
    say(result.table())
    return result


def score(model_set: ModelSet, name: str, val_dir: Path) -> dict:
    """``name``'s mAP on ``val_dir`` through the serving path (baseline)."""
    detector = Detector.from_model_set(model_set, Settings(models=(name,)), torch.device("cpu"))
    return evaluate(detector, val_dir, name).summary()
