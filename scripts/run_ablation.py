#!/usr/bin/env python
"""Ablation: every optimization on one device, its latency and speed-up over the baseline, and
the quality of its answer against the baseline's, all in one run (detlab.experiments.ablation).

    python scripts/run_ablation.py                                   # every optimization the device supports
    python scripts/run_ablation.py --optimizations baseline,channels_last --requests 4     # quick
    python scripts/run_ablation.py --device cuda --requests 100

Writes outputs/ablation/ablation_results.json, ablation_report.txt, ablation.png (build artifacts in
outputs/ablation/artifacts/); mAP on the labelled val images of `make dataset`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paths import MODEL_SET, OUTPUTS, PHOTOS, ROOT

from detlab.experiments import ablation
from multidet.device import select_device
from multidet.optimizations import OPTIMIZATIONS, SERVABLE, list_optimizations


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--optimizations",
        default=None,
        help="comma-separated (default: every optimization the device supports, less those identical to another there)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--requests", type=int, default=24, help="timed requests per path")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model-set", type=Path, default=MODEL_SET)
    p.add_argument("--out", type=Path, default=OUTPUTS / "ablation")
    p.add_argument(
        "--val", type=Path, default=ROOT / "data", help="folder with MODEL/val datasets (`make dataset`) for mAP"
    )
    p.add_argument("--val-images", type=int, default=50, help="val images per model for mAP (default 50; 200 = all)")
    args = p.parse_args(argv)

    device = select_device(args.device)
    names = (
        args.optimizations.split(",")
        if args.optimizations
        else list_optimizations(device, servable=True, distinct=True)
    )
    unknown = [n for n in names if n not in OPTIMIZATIONS]
    if unknown:
        p.error(f"unknown path(s) {unknown}; available: {SERVABLE}")
    result = ablation.run(
        args.model_set,
        names,
        device,
        PHOTOS,
        args.val,
        args.out / "artifacts",
        requests=args.requests,
        warmup=args.warmup,
        val_images=args.val_images,
    )
    result.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
