"""Ablation: every optimization on one device, its latency and speed-up over the baseline, and
the quality of its answer against the baseline's, all in one run so the ratios are comparable.

Latency: end to end per image in the core package (decode to response) at the serving threshold,
paths interleaved request by request after a warm-up, the device synchronised around each clock
read. Quality: each optimization's mAP@0.5 and mAP@[.5:.95] per model on the labelled val images
(``<val>/<model>/val``, ``val_images`` per model), through the whole data path, and its verdict under
its tier's rule (multidet.quality): exact optimizations must give the baseline's detections at the serving
threshold and its mAP within 0.1 points; reduced-precision optimizations must stay within 0.5 points of the
baseline's mAP. Each optimization's build step (what ``make mar`` runs: the ONNX export, the AOT compile, the
Inductor cache) is timed separately from its load.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from multidet.config import Settings
from multidet.device import synchronize
from multidet.optimizations import OPTIMIZATIONS, build_optimization
from multidet.pipeline import Detector
from multidet.quality import judge
from multidet.timing import interleaved

from .. import build
from ..bench import environment, photos, summarize
from ..evaluation import EvalResult, evaluate
from . import Result, Say, say_flush, shown


def map_quality(reference: dict[str, EvalResult], results: dict[str, EvalResult], tier: str) -> dict:
    """The path's mAP on each model's labelled val images, and its verdict under its tier's rule
    (multidet.quality): exact = the baseline's detections at the serving threshold on every image and
    mAP within 0.1 points; reduced = mAP at most 0.5 points below the baseline's."""
    keys = [(m, i) for m in reference for i in reference[m].detections]
    verdict = judge(
        [reference[m].detections[i] for m, i in keys],
        [results[m].detections[i] for m, i in keys],
        {m: {"mAP@0.5": r.map50, "mAP": r.map} for m, r in reference.items()},
        {m: {"mAP@0.5": r.map50, "mAP": r.map} for m, r in results.items()},
        tier,
    )
    checks = verdict.checks
    return {
        "map50": {m: round(r.map50, 4) for m, r in results.items()},
        "map": {m: round(r.map, 4) for m, r in results.items()},
        "map50_mean": round(statistics.mean(r.map50 for r in results.values()), 4),
        "map_mean": round(statistics.mean(r.map for r in results.values()), 4),
        "delta_map50_points": round(100 * max((results[m].map50 - reference[m].map50 for m in reference), key=abs), 3),
        "delta_map_points": round(100 * max((results[m].map - reference[m].map for m in reference), key=abs), 3),
        "detections": sum(c.candidate for c in checks),
        "matched": sum(c.matched for c in checks),
        "missing": sum(c.missing for c in checks),
        "extra": sum(c.extra for c in checks),
        "swaps": sum(c.swaps for c in checks),
        "max_box_diff_px": round(max((c.max_box_diff for c in checks), default=0.0), 5),
        "max_score_diff": float(f"{max((c.max_score_diff for c in checks), default=0.0):.3g}"),
        "images": sum(r.images for r in results.values()),
        "same_answer": verdict.same,
        "why_not": verdict.reasons,
    }


def plot(rows: list[dict], meta: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["optimization"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = ["#4c72b0" if r["tier"] == "exact" else "#dd8452" for r in rows]
    ax1.bar(names, [r["speedup_p50"] for r in rows], color=colors)
    ax1.axhline(1.0, color="black", lw=0.8)
    for i, r in enumerate(rows):
        ax1.text(
            i,
            r["speedup_p50"],
            f"{r['speedup_p50']:.2f}x\n{r['latency_ms']['p50']:.0f} ms",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax1.set_ylim(0, max(r["speedup_p50"] for r in rows) * 1.2)
    ax1.set_ylabel("speed-up over baseline (p50 latency)")
    ax1.set_title(f"{meta['device']} ({meta['device_name']}): blue exact, orange reduced precision", fontsize=9)
    width = 0.4
    xs = range(len(rows))
    ax2.bar([x - width / 2 for x in xs], [r["quality"]["map50_mean"] for r in rows], width, label="mAP@0.5")
    ax2.bar([x + width / 2 for x in xs], [r["quality"]["map_mean"] for r in rows], width, label="mAP@[.5:.95]")
    ax2.set_xticks(list(xs), names)
    ax2.set_ylim(0, 1.0)
    for x, r in zip(xs, rows):
        ax2.text(
            x, r["quality"]["map50_mean"] + 0.01, "=" if r["quality"]["same_answer"] else "x", ha="center", fontsize=8
        )
    ax2.set_title(
        f"mAP on the labelled val images, mean of {len(rows[0]['quality']['map50'])} models "
        "(=: the baseline's answer by the tier's rule)",
        fontsize=9,
    )
    ax2.legend(fontsize=8, loc="lower left")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right", rotation_mode="anchor")
    fig.suptitle(
        f"Ablation, {meta['environment']['date'][:10]}, torch {meta['environment']['versions']['torch']}, "
        f"{meta['requests']} requests/path",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(rows: list[dict], meta: dict) -> str:
    env = meta["environment"]
    lines = [
        f"Ablation {env['date']}  {meta['device']} ({meta['device_name']}), {env['cpu_cores']} cores, "
        f"torch {env['versions']['torch']}",
        f"{meta['requests']} timed requests per path after {meta['warmup']} warm-up, interleaved; "
        f"threshold {meta['threshold']}; photos {', '.join(meta['images'])}; "
        f"quality: {meta['val_images']} labelled val images per model ({meta['val']})",
        "",
    ]
    head = (
        f"{'optimization':<24} {'tier':>7} {'p50 ms':>8} {'p99 ms':>8} {'mean':>8} {'std':>6} {'speed-up':>8} "
        f"{'build s':>7} {'load s':>7} {'mAP@.5':>7} {'mAP':>6} {'dmAP pt':>7} {'max box':>8} {'same':>5}"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        q, lat = r["quality"], r["latency_ms"]
        lines.append(
            f"{r['optimization']:<24} {r['tier']:>7} {lat['p50']:>8.1f} {lat['p99']:>8.1f} "
            f"{lat['mean']:>8.1f} {lat['std']:>6.1f} {r['speedup_p50']:>7.2f}x "
            f"{r['build_s']:>7.1f} {r['load_s']:>7.1f} "
            f"{q['map50_mean']:>7.3f} {q['map_mean']:>6.3f} {q['delta_map50_points']:>7.2f} "
            f"{q['max_box_diff_px']:>8.3f} {'yes' if q['same_answer'] else 'NO':>5}"
        )
    best = max(
        (r for r in rows if r["optimization"] != "auto"),  # auto is one of the others, chosen at load
        key=lambda r: r["speedup_p50"] if r["quality"]["same_answer"] and r["tier"] == "exact" else 0,
    )
    lines += [
        "",
        "mAP@.5 / mAP: mean over the models' val images (per model in the JSON); dmAP pt: the "
        "largest change in mAP@.5 against the baseline, in points; same: the tier's rule (multidet.quality)",
        f"fastest exact optimization with the baseline's answer: {best['optimization']} ({best['speedup_p50']:.2f}x, "
        f"{best['latency_ms']['p50']:.1f} ms p50)",
    ]
    return "\n".join(lines) + "\n"


class AblationResult(Result):
    stem = "ablation"

    @property
    def rows(self) -> list[dict]:
        return self.data["optimizations"]

    def report(self) -> str:
        return report(self.rows, self.data["meta"])

    def plot(self, png: Path) -> Path:
        return plot(self.rows, self.data["meta"], png)


def run(
    model_set: Path,
    names: Sequence[str],
    device: torch.device,
    photo_dir: Path,
    val: Path,
    artifacts: Path,
    requests: int = 24,
    warmup: int = 2,
    val_images: int = 50,
    say: Say = say_flush,
) -> AblationResult:
    """Build, load, score and time ``names`` (the baseline first, added if missing) on ``device``;
    ``photo_dir``: the timed photos and INT8 calibration images; ``artifacts``: the build steps' output."""
    names = ["baseline"] + [n for n in names if n != "baseline" and OPTIMIZATIONS[n].supports(device)]
    images = photos(photo_dir)
    bodies = list(images.values())

    detectors, load_s, build_s = {}, {}, {}
    for name in names:
        t0 = time.perf_counter()
        if name != "baseline":
            build_optimization(name, detectors["baseline"].models, artifacts, build.context(photos=photo_dir))
        build_s[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        det = Detector.from_model_set(model_set, Settings(optimization=name), device, artifacts)
        for i in range(warmup):
            det.predict_one(bodies[i % len(bodies)])
        detectors[name], load_s[name] = det, time.perf_counter() - t0
        say(
            f"{name}: built in {build_s[name]:.1f} s, loaded as {det.description} in {load_s[name]:.1f} s "
            f"(incl. {warmup} warm-up requests)"
        )

    evals = {}
    for name, det in detectors.items():
        t0 = time.perf_counter()
        evals[name] = {m: evaluate(det, val / m / "val", m, limit=val_images) for m in det.model_names}
        say(
            f"mAP {name}: "
            + "  ".join(f"{m} {r.map50:.3f}/{r.map:.3f}" for m, r in evals[name].items())
            + f" ({time.perf_counter() - t0:.0f} s)"
        )
    t_start = time.perf_counter()

    def progress(done: int, times: dict) -> None:
        if done % max(1, requests // 6) == 0 or done == requests:
            say(
                f"{done}/{requests} ({time.perf_counter() - t_start:.0f} s): "
                + "  ".join(f"{n} {statistics.median(v):.0f}" for n, v in times.items())
                + " ms p50"
            )

    calls = {name: (lambda i, det=det: det.predict_one(bodies[i % len(bodies)])) for name, det in detectors.items()}
    times = interleaved(calls, requests, sync=lambda: synchronize(device), progress=progress).ms

    base = summarize(times["baseline"])
    rows = []
    for name, det in detectors.items():
        lat = summarize(times[name])
        rows.append(
            {
                "optimization": name,
                "runs_as": det.description,
                "tier": OPTIMIZATIONS[name].tier,
                "latency_ms": lat,
                "speedup_p50": round(base["p50"] / lat["p50"], 3),
                "speedup_mean": round(base["mean"] / lat["mean"], 3),
                "build_s": round(build_s[name], 1),
                "load_s": round(load_s[name], 1),
                "quality": map_quality(evals["baseline"], evals[name], OPTIMIZATIONS[name].tier),
            }
        )
        say(f"quality {name}: {rows[-1]['quality']}")
    env = environment([device])
    meta = {
        "environment": env,
        "device": str(device),
        "device_name": env["devices"][str(device)],
        "requests": requests,
        "warmup": warmup,
        "threshold": Settings().threshold,
        "images": list(images),
        "val": shown(val),
        "val_images": val_images,
    }
    return AblationResult({"meta": meta, "optimizations": rows})
