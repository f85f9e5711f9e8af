#!/usr/bin/env python
"""Ablation: every optimisation path on one device, its latency and speed-up over the baseline, and
the quality of its answer against the baseline's, all in one run so the ratios are comparable.

    python scripts/run_ablation.py                                   # every path the device supports
    python scripts/run_ablation.py --paths baseline,channels_last --requests 4     # quick
    python scripts/run_ablation.py --device cuda --requests 100

Latency: end to end per image in the core package (decode to response) at the serving threshold,
paths interleaved request by request after a warm-up, the device synchronised around each clock
read. Quality: at threshold 0 (top 100 per model, the strictest comparison) on every photo,
detections matched one to one with the baseline's (same model and label, IoU >= 0.5): label
accuracy (matched / max(count)), mean IoU of matched boxes, box MSE (px^2), score MSE, max
differences. Each path's build step (what `make mar` runs: the ONNX export, the AOT compile, the Inductor cache)
is timed separately from its load. Writes outputs/ablation/ablation_results.json,
ablation_report.txt, ablation.png (build artifacts in outputs/ablation/artifacts/).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from multidet.bench import environment, photos, summarize, timed_predict, write_outputs
from multidet.compare import compare
from multidet.config import Settings
from multidet.device import select_device
from multidet.pipeline import Detector, RequestOptions
from multidet.runners import RUNNERS, SERVABLE

ROOT = Path(__file__).resolve().parents[1]


def quality(reference: dict, detector: Detector, images: dict[str, bytes]) -> dict:
    """The path's answer vs the baseline's, worst image for each figure."""
    ags = [compare(reference[img], detector.predict_one(body, RequestOptions(threshold=0.0))["detections"])
           for img, body in images.items()]
    return {
        "label_accuracy": round(min(a.label_agreement for a in ags), 4),
        "mean_iou": round(min(a.mean_iou for a in ags), 4),
        "box_mse_px2": float(f"{max(a.box_mse for a in ags):.3g}"),
        "score_mse": float(f"{max(a.score_mse for a in ags):.3g}"),
        "max_box_diff_px": round(max(a.max_box_diff for a in ags), 5),
        "max_score_diff": float(f"{max(a.max_score_diff for a in ags):.3g}"),
        "equivalent": all(a.equivalent() for a in ags),
        "detections": sum(a.candidate for a in ags), "matched": sum(a.matched for a in ags),
    }


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["path"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = ["#4c72b0" if r["exact"] else "#dd8452" for r in rows]
    ax1.bar(names, [r["speedup_p50"] for r in rows], color=colors)
    ax1.axhline(1.0, color="black", lw=0.8)
    for i, r in enumerate(rows):
        ax1.text(i, r["speedup_p50"], f"{r['speedup_p50']:.2f}x\n{r['latency_ms']['p50']:.0f} ms",
                 ha="center", va="bottom", fontsize=7)
    ax1.set_ylim(0, max(r["speedup_p50"] for r in rows) * 1.2)
    ax1.set_ylabel("speed-up over baseline (p50 latency)")
    ax1.set_title(f"{meta['device']} ({meta['device_name']}): blue exact, orange reduced precision", fontsize=9)
    width = 0.4
    xs = range(len(rows))
    ax2.bar([x - width / 2 for x in xs], [r["quality"]["label_accuracy"] for r in rows], width, label="label accuracy")
    ax2.bar([x + width / 2 for x in xs], [r["quality"]["mean_iou"] for r in rows], width, label="mean IoU")
    ax2.set_xticks(list(xs), names)
    low = min(min(r["quality"]["label_accuracy"], r["quality"]["mean_iou"]) for r in rows)
    ax2.set_ylim(min(0.8, low - 0.05), 1.005)
    ax2.axhline(0.95, color="grey", ls="--", lw=0.8)
    ax2.set_title("agreement with the baseline (threshold 0, worst photo)", fontsize=9)
    ax2.legend(fontsize=8, loc="lower left")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right", rotation_mode="anchor")
    fig.suptitle(f"Ablation, {meta['environment']['date'][:10]}, torch {meta['environment']['versions']['torch']}, "
                 f"{meta['requests']} requests/path", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict], meta: dict) -> str:
    env = meta["environment"]
    lines = [f"Ablation {env['date']}  {meta['device']} ({meta['device_name']}), {env['cpu_cores']} cores, "
             f"torch {env['versions']['torch']}",
             f"{meta['requests']} timed requests per path after {meta['warmup']} warm-up, interleaved; "
             f"threshold {meta['threshold']} for latency, 0 for quality; photos {', '.join(meta['images'])}", ""]
    head = (f"{'path':<24} {'exact':>5} {'p50 ms':>8} {'p99 ms':>8} {'mean':>8} {'std':>6} {'speed-up':>8} {'build s':>7} {'load s':>7} "
            f"{'label acc':>9} {'mean IoU':>8} {'box MSE':>9} {'score MSE':>9}")
    lines += [head, "-" * len(head)]
    for r in rows:
        q, lat = r["quality"], r["latency_ms"]
        lines.append(f"{r['path']:<24} {'yes' if r['exact'] else 'no':>5} {lat['p50']:>8.1f} {lat['p99']:>8.1f} "
                     f"{lat['mean']:>8.1f} {lat['std']:>6.1f} {r['speedup_p50']:>7.2f}x {r['build_s']:>7.1f} {r['load_s']:>7.1f} "
                     f"{q['label_accuracy']:>9.3f} {q['mean_iou']:>8.3f} {q['box_mse_px2']:>9.2g} {q['score_mse']:>9.2g}")
    best = max((r for r in rows if r["path"] != "auto"),  # auto is one of the others, chosen at load
               key=lambda r: r["speedup_p50"] if r["quality"]["equivalent"] else 0)
    lines += ["", f"fastest path with the baseline's answer: {best['path']} ({best['speedup_p50']:.2f}x, "
                  f"{best['latency_ms']['p50']:.1f} ms p50)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", default=None, help="comma-separated (default: every path the device supports)")
    p.add_argument("--device", default="auto")
    p.add_argument("--requests", type=int, default=24, help="timed requests per path")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "ablation")
    args = p.parse_args(argv)

    device = select_device(args.device)
    names = args.paths.split(",") if args.paths else SERVABLE
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        p.error(f"unknown path(s) {unknown}; available: {SERVABLE}")
    names = ["baseline"] + [n for n in names if n != "baseline" and RUNNERS[n].supports(device)]
    images = photos()
    bodies = list(images.values())

    detectors, load_s, build_s = {}, {}, {}
    artifacts = args.out / "artifacts"  # each path's build step (ONNX export, AOT compile...), as make mar runs it
    for name in names:
        t0 = time.perf_counter()
        if name != "baseline":
            RUNNERS[name].build(detectors["baseline"].models, artifacts)
        build_s[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        det = Detector.from_checkpoints(ROOT / "checkpoints", Settings(optimization=name), device, artifacts)
        for i in range(args.warmup):
            det.predict_one(bodies[i % len(bodies)])
        detectors[name], load_s[name] = det, time.perf_counter() - t0
        print(f"{name}: built in {build_s[name]:.1f} s, loaded as {det.runner.description} in {load_s[name]:.1f} s "
              f"(incl. {args.warmup} warm-up requests)", flush=True)

    reference = {img: detectors["baseline"].predict_one(b, RequestOptions(threshold=0.0))["detections"]
                 for img, b in images.items()}
    times: dict[str, list[float]] = {n: [] for n in names}
    t_start = time.perf_counter()
    for i in range(args.requests):
        for name, det in detectors.items():
            times[name].append(timed_predict(det, bodies[i % len(bodies)])[0])
        if (i + 1) % max(1, args.requests // 6) == 0 or i + 1 == args.requests:
            print(f"{i + 1}/{args.requests} ({time.perf_counter() - t_start:.0f} s): "
                  + "  ".join(f"{n} {statistics.median(v):.0f}" for n, v in times.items()) + " ms p50", flush=True)

    base = summarize(times["baseline"])
    rows = []
    for name, det in detectors.items():
        lat = summarize(times[name])
        rows.append({"path": name, "runs_as": det.runner.description, "exact": RUNNERS[name].exact,
                     "latency_ms": lat, "speedup_p50": round(base["p50"] / lat["p50"], 3),
                     "speedup_mean": round(base["mean"] / lat["mean"], 3), "build_s": round(build_s[name], 1),
                     "load_s": round(load_s[name], 1),
                     "quality": quality(reference, det, images)})
        print(f"quality {name}: {rows[-1]['quality']}", flush=True)
    env = environment([device])
    meta = {"environment": env, "device": str(device), "device_name": env["devices"][str(device)],
            "requests": args.requests, "warmup": args.warmup, "threshold": Settings().threshold, "images": list(images)}
    write_outputs(args.out, "ablation", {"meta": meta, "paths": rows}, report(rows, meta))
    plot(rows, meta, args.out / "ablation.png")
    print(f"written: {args.out}/ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
