#!/usr/bin/env python
"""Refit models 2..N of a set onto model 1's trunk: each keeps model 1's backbone (or backbone + BiFPN, or all
but its class net) frozen, bit for bit, and fine-tunes the rest on its own data, so the service computes the
common part once per image (README, "Shared work"). Reports each model's mAP and the set's latency before and
after (detlab.refit).

    python scripts/refit.py --model-set my_models.yaml \\
        --data pets=my_data/pets --data signs=my_data/signs --steps 500 --out outputs/refit
    make refit MODELS=my_models.yaml DATA="pets=my_data/pets signs=my_data/signs"

Each DATA folder holds train/ and val/ (images/ + annotations.json, COCO; category ids are the model's 1-based
class ids). Writes OUT/models.yaml (serve it: make serve MODELS=OUT/models.yaml), OUT/<model>/ (resumable
runs) and OUT/refit.json. A model without --data is left as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from paths import MODEL_SET, OUTPUTS, PHOTOS

from detlab.bench import photos
from detlab.refit import refit
from detlab.training import FROZEN, TrainConfig
from multidet.config import ConfigError
from multidet.optimizations import SERVABLE


def main(argv=None) -> int:
    d = TrainConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-set", type=Path, default=MODEL_SET)
    p.add_argument("--data", action="append", default=[], metavar="NAME=DIR", help="a model's train/ and val/ folder")
    p.add_argument("--freeze", choices=sorted(set(FROZEN) - {"none"}), default="all_but_class_net")
    p.add_argument("--out", type=Path, default=OUTPUTS / "refit")
    for name in ("steps", "batch_size", "lr", "image_size", "seed", "eval_every", "bn_recalibrate"):
        default = d[name].default
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=f"default {default}")
    p.add_argument("--optimization", default="baseline", choices=SERVABLE, help="the path the latency is timed on")
    p.add_argument("--requests", type=int, default=10, help="timed requests per set")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        data = dict(item.split("=", 1) for item in args.data)
    except ValueError:
        p.error("--data takes NAME=DIR")
    if not data:
        p.error("give at least one --data NAME=DIR (models 2..N of the set)")
    fields = {
        k: getattr(args, k) for k in ("steps", "batch_size", "lr", "image_size", "seed", "eval_every", "bn_recalibrate")
    }
    try:
        result = refit(
            args.model_set,
            {name: Path(folder) for name, folder in data.items()},
            args.out,
            list(photos(PHOTOS).values()),
            freeze=args.freeze,
            train_fields=fields,
            optimization=args.optimization,
            requests=args.requests,
            photos=PHOTOS,
        )
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (args.out / "refit.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(f"written {args.out / 'refit.json'}; serve the refitted set: make serve MODELS={result.set_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
