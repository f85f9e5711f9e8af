#!/usr/bin/env python
"""Seeded random checkpoints for a model set (effdet state_dict + JSON metadata), and a models file
listing them; or one imported checkpoint of your own.

    python scripts/generate_checkpoints.py                    # every model of models.yaml -> checkpoints/
    python scripts/generate_checkpoints.py --model-set my.yaml --out my_random
    python scripts/generate_checkpoints.py --pretrained       # effdet's COCO weights (needs network)
    python scripts/generate_checkpoints.py --from my.pth --name pets --architecture efficientdet_d0 \\
        --class-names classes.txt --out mine          # checked, with metadata: mine/pets.pth + .json

Generated checkpoints have each model's name, architecture and classes, and are untrained: their
scores are low (tests of arithmetic). A re-run with the same seed writes byte-identical files (same
sha256) and skips models that are already up to date. ``<out>/models.yaml`` lists what was written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paths import MODEL_SET, PHOTOS

from detlab.checkpoints import generate_model_set, pretrained_state_dict, save_checkpoint
from multidet.config import ConfigError
from multidet.modelset import MODELS_FILE, ModelEntry, ModelSet, load_models, read_model_set
from multidet.weights import CheckpointError, num_classes_of, read_state_dict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-set", type=Path, default=MODEL_SET, help="whose models to generate (default: models.yaml)")
    p.add_argument("--out", type=Path, default=Path("checkpoints"), help="output folder (default: checkpoints)")
    p.add_argument("--seed", type=int, default=0, help="base seed; model k uses seed+k (default 0)")
    p.add_argument("--models", default="", help="comma-separated subset of the set (default: all)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="effdet's pretrained COCO weights (downloads)")
    src.add_argument("--from", dest="from_path", type=Path, metavar="PATH", help="import your own effdet checkpoint")
    p.add_argument("--name", help="with --from: the model's name")
    p.add_argument("--architecture", default="efficientdet_d0", help="with --from: its effdet architecture")
    p.add_argument("--class-names", type=Path, help="with --from: a text file, one class name per line")
    p.add_argument(
        "--calibration-images",
        type=Path,
        default=PHOTOS,
        help="photos whose statistics set the generated models' BatchNorm (default: load_tests/images)",
    )
    p.add_argument("--force", action="store_true", help="rewrite even if up to date")
    args = p.parse_args(argv)
    try:
        if args.from_path:
            return import_one(p, args)
        model_set = read_model_set(args.model_set).select([n for n in args.models.split(",") if n.strip()])
        specs = [(e.name, e.architecture, list(e.class_names)) for e in model_set]
        if args.pretrained:
            return pretrained(specs, model_set, args)
        photos = sorted(f for f in args.calibration_images.glob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not photos:
            raise CheckpointError(f"no calibration photos (*.jpg, *.png) in {args.calibration_images}")
        generate_model_set(
            specs,
            args.out,
            [f.read_bytes() for f in photos],
            seed=args.seed,
            thresholds={e.name: e.threshold for e in model_set if e.threshold is not None},
            force=args.force,
            progress=lambda line: print(line, flush=True),
        )
        print(f"model set: {args.out / MODELS_FILE}", flush=True)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def import_one(p: argparse.ArgumentParser, args) -> int:
    if not args.name:
        p.error("--from imports one checkpoint: name it with --name NAME")
    state = read_state_dict(args.from_path)
    found = num_classes_of(state, args.architecture)
    if args.class_names:
        classes = [line.strip() for line in args.class_names.read_text().splitlines() if line.strip()]
    else:
        classes = [f"class_{i}" for i in range(1, found + 1)]
    if found != len(classes):
        raise CheckpointError(
            f"{args.from_path} has {found} classes, {args.class_names} names {len(classes)}: one name per class"
        )
    save_checkpoint(
        args.out, args.name, args.architecture, classes, state, seed=None, source=f"import:{args.from_path.name}"
    )
    entry = ModelEntry(args.name, args.architecture, (args.out / f"{args.name}.pth").resolve())
    ModelSet((entry,)).write(args.out / MODELS_FILE)
    load_models(read_model_set(args.out / MODELS_FILE))  # as the service will load it
    print(f"wrote {entry.weights} and {args.out / MODELS_FILE}", flush=True)
    return 0


def pretrained(specs, model_set: ModelSet, args) -> int:
    entries = []
    for k, (name, architecture, classes) in enumerate(specs):
        state = pretrained_state_dict(architecture, len(classes), args.seed + k)
        save_checkpoint(
            args.out, name, architecture, classes, state, seed=args.seed + k, source="pretrained:effdet-coco"
        )
        entries.append(ModelEntry(name, architecture, (args.out / f"{name}.pth").resolve()))
        print(f"[{k + 1}/{len(specs)}] {name}: wrote {entries[-1].weights}", flush=True)
    ModelSet(tuple(entries)).write(args.out / MODELS_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
