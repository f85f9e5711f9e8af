#!/usr/bin/env python
"""COCO mAP of one model through the whole data path (decode -> letterbox -> optimization -> NMS -> boxes).

    python scripts/evaluate.py --data data/NAME/val --model NAME --optimization baseline
    python scripts/evaluate.py --data my_export/valid --model pets --model-set my.yaml --json outputs/eval/pets.json

Prints (and with --json writes) {"model", "optimization", "map50", "map", "images"}; map50 is AP at
IoU 0.5, map the COCO AP over IoU 0.5:0.95, both in 0..1. Every optimization the registry serves can be
evaluated; paths with a build step (ONNX export, AOT compile) build into --artifacts first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from paths import MODEL_SET, PHOTOS, ROOT
from tqdm import tqdm

from detlab import build
from detlab.evaluation import evaluate
from multidet.config import Settings
from multidet.device import select_device
from multidet.optimizations import SERVABLE, build_optimization
from multidet.pipeline import Detector
from multidet.weights import CheckpointError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="dataset folder: images/ + annotations.json (COCO)")
    p.add_argument("--model", required=True, help="a model of --model-set")
    p.add_argument("--optimization", default="baseline", choices=SERVABLE)
    p.add_argument("--model-set", type=Path, default=MODEL_SET, help="models file (default: models.yaml)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--artifacts", type=Path, default=ROOT / "outputs" / "eval" / "artifacts")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    device = select_device(args.device)
    try:
        settings = Settings(optimization=args.optimization, models=(args.model,))
        if args.optimization != "baseline":  # its build step, as `make mar` runs it (most paths have none)
            base = Detector.from_model_set(args.model_set, Settings(models=(args.model,)), "cpu")
            build_optimization(args.optimization, base.models, args.artifacts, build.context(photos=PHOTOS))
        detector = Detector.from_model_set(args.model_set, settings, device, args.artifacts)
    except (CheckpointError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tqdm(desc=f"eval {args.model} {args.optimization}", unit="img") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = evaluate(
            detector, args.data, args.model, batch_size=args.batch_size, limit=args.limit, progress=progress
        )
    summary = result.summary()
    print(json.dumps(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
