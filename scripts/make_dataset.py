#!/usr/bin/env python
"""Write a labelled, synthetic detection dataset for one model of a model set (COCO format), offline
and deterministic.

    python scripts/make_dataset.py --model NAME --split val --count 200 --seed 0 --out data/NAME/val

Writes OUT/images/*.jpg and OUT/annotations.json (category ids = the model's class ids). The same
arguments write byte-identical files. `make dataset` builds every split the training recipe
(training.yaml) names. What the images contain: detlab/synthetic.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from paths import MODEL_SET, PHOTOS
from tqdm import tqdm

from detlab.synthetic import SPLITS, DataSpec, make_dataset
from multidet.modelset import read_model_set


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model of --model-set")
    p.add_argument("--model-set", type=Path, default=MODEL_SET)
    p.add_argument("--class-ids", default="", help="comma-separated class ids the data draws (default: all named)")
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--count", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--photos",
        type=Path,
        default=PHOTOS,
        help="photos cropped for backgrounds (default: load_tests/images)",
    )
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be >= 1")
    model_set = read_model_set(args.model_set)
    if args.model not in model_set.names:
        p.error(f"{args.model} is not in {args.model_set} {list(model_set.names)}")
    ids = tuple(int(c) for c in args.class_ids.split(",") if c.strip()) or None
    spec = DataSpec(args.model, model_set[args.model].class_names, ids)
    t0 = time.perf_counter()
    with tqdm(total=args.count, desc=f"{args.model} {args.split}", unit="img") as bar:
        coco = make_dataset(
            spec, args.split, args.count, args.seed, args.out, args.photos, progress=lambda i, n: bar.update(1)
        )
    print(
        f"{args.out}: {len(coco['images'])} images, {len(coco['annotations'])} objects, "
        f"{len(coco['categories'])} classes ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
