#!/usr/bin/env python
"""Every optimisation path on this device: latency per image and agreement with the baseline.

    python scripts/compare_paths.py                     # all paths valid on the device, 3 rounds
    python scripts/compare_paths.py --paths baseline,grouped --rounds 5 --device cuda

Paths are timed in interleaved rounds (baseline, A, B, ..., baseline, A, B, ...) on the same photos
after a warm-up, so a noisy machine does not favour one; the device is synchronised before each
clock read. Agreement is measured at threshold 0 (top 100 per model): detections matched one to one
(same model + label, IoU >= 0.5), label agreement, mean IoU, max box/score differences.
Writes outputs/paths/paths.json and paths.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from multidet.compare import compare
from multidet.config import Settings
from multidet.device import select_device, synchronize
from multidet.pipeline import Detector, RequestOptions
from multidet.runners import RUNNERS

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", default=None, help="comma-separated (default: every registered path the device supports)")
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "paths")
    args = p.parse_args(argv)

    device = select_device(args.device)
    names = args.paths.split(",") if args.paths else ["baseline"] + sorted(n for n in RUNNERS if n != "baseline")
    names = [n for n in names if RUNNERS[n].supports(device)]
    photos = {f.stem: f.read_bytes() for f in sorted((ROOT / "load_tests" / "images").glob("*.jpg"))}
    opts = RequestOptions(threshold=0.0)

    detectors, build_s = {}, {}
    for name in names:
        t0 = time.perf_counter()
        detectors[name] = Detector.from_checkpoints(ROOT / "checkpoints", Settings(optimization=name), device)
        detectors[name].warmup(1)
        build_s[name] = time.perf_counter() - t0
        print(f"loaded {name} ({build_s[name]:.1f} s incl. warm-up)", flush=True)

    reference = {img: detectors["baseline"].predict_one(b, opts) for img, b in photos.items()}
    times: dict[str, list[float]] = {n: [] for n in names}
    agreement = {}
    for r in range(args.rounds):
        for name in names:
            for img, body in photos.items():
                synchronize(device)
                t0 = time.perf_counter()
                out = detectors[name].predict_one(body, opts)
                synchronize(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
                if r == 0:
                    agreement.setdefault(name, []).append(compare(reference[img]["detections"], out["detections"]))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {statistics.median(times[n]):.0f} ms"
                                                        for n in names), flush=True)

    base = statistics.median(times["baseline"])
    rows = []
    for name in names:
        ag = agreement[name]
        rows.append({
            "path": name, "exact": RUNNERS[name].exact, "median_ms": round(statistics.median(times[name]), 1),
            "min_ms": round(min(times[name]), 1), "speedup": round(base / statistics.median(times[name]), 3),
            "load_s": round(build_s[name], 1),
            "label_agreement": round(min(a.label_agreement for a in ag), 4),
            "mean_iou": round(min(a.mean_iou for a in ag), 4),
            "max_box_diff_px": round(max(a.max_box_diff for a in ag), 5),
            "max_score_diff": float(f"{max(a.max_score_diff for a in ag):.3g}"),
            "box_mse": float(f"{max(a.box_mse for a in ag):.3g}"),
            "score_mse": float(f"{max(a.score_mse for a in ag):.3g}"),
        })
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds,
            "images": list(photos), "requests_per_path": len(times["baseline"])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paths.json").write_text(json.dumps({"meta": meta, "paths": rows}, indent=2) + "\n")
    header = ("| path | exact | median ms/img | speed-up | label agreement (worst image) | mean IoU (worst) "
              "| max box diff px | max score diff |\n|---|---|---|---|---|---|---|---|\n")
    table = header + "".join(
        f"| {r['path']} | {'yes' if r['exact'] else 'no'} | {r['median_ms']} | {r['speedup']:.2f}x | "
        f"{r['label_agreement']:.3f} | {r['mean_iou']:.3f} | {r['max_box_diff_px']:.4f} | {r['max_score_diff']:.2g} |\n"
        for r in rows)
    (args.out / "paths.md").write_text(f"{meta['date']}, {meta['device']} ({meta['device_name']}), "
                                       f"torch {meta['torch']}, {meta['cpus']} threads, {args.rounds} interleaved "
                                       f"rounds x {len(photos)} photos, end to end per image (decode to JSON)\n\n"
                                       + table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
