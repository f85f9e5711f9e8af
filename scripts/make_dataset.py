#!/usr/bin/env python
"""Write a labelled, synthetic detection dataset for one model (COCO format), offline and deterministic.

    python scripts/make_dataset.py --model efficientdet_d0_aquarium --split val --count 200 --seed 0 \
        --out data/aquarium/val

Writes OUT/images/*.jpg and OUT/annotations.json (category ids = the model's class ids). The same
arguments write byte-identical files. `make dataset` builds the default train/val splits of all
three models. What the images contain: multidet/synthetic.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from multidet.config import MODEL_NAMES
from multidet.synthetic import SPLITS, make_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=MODEL_NAMES)
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--count", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--photos",
        type=Path,
        default=Path("load_tests/images"),
        help="photos cropped for backgrounds (default: load_tests/images)",
    )
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be >= 1")
    t0 = time.perf_counter()
    with tqdm(total=args.count, desc=f"{args.model} {args.split}", unit="img") as bar:
        coco = make_dataset(
            args.model, args.split, args.count, args.seed, args.out, args.photos, progress=lambda i, n: bar.update(1)
        )
    print(
        f"{args.out}: {len(coco['images'])} images, {len(coco['annotations'])} objects, "
        f"{len(coco['categories'])} classes ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
