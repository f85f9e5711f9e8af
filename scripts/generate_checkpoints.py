#!/usr/bin/env python
"""Write the three EfficientDet-D0 checkpoints (effdet state_dict format + JSON metadata).

    python scripts/generate_checkpoints.py                      # seeded, offline, deterministic
    python scripts/generate_checkpoints.py --pretrained         # effdet's COCO weights (needs network)
    python scripts/generate_checkpoints.py --from my.pth --model efficientdet_d0_vehicles

Seeded checkpoints are untrained: their scores are low. A re-run with the same seed writes
byte-identical files (same sha256) and skips models that are already up to date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from multidet.checkpoints import (
    CheckpointError,
    CheckpointMeta,
    generate_state_dict,
    import_state_dict,
    load_checkpoint,
    num_classes_of,
    pretrained_state_dict,
    save_checkpoint,
)
from multidet.config import MODEL_NAMES, MODEL_SPECS, ModelSpec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("checkpoints"), help="output folder (default: checkpoints)")
    p.add_argument("--seed", type=int, default=0, help="base seed; model k uses seed+k (default 0)")
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated subset to write")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--pretrained",
        action="store_true",
        help="start from effdet's pretrained COCO weights (downloads; fails clearly offline)",
    )
    src.add_argument(
        "--from",
        dest="from_path",
        type=Path,
        metavar="PATH",
        help="import your own effdet checkpoint for --models (exactly one model)",
    )
    p.add_argument("--class-names", type=Path, help="with --from: a text file, one class name per line")
    p.add_argument(
        "--calibration-images",
        type=Path,
        default=Path("load_tests/images"),
        help="photos whose statistics set the generated models' BatchNorm (default: load_tests/images)",
    )
    p.add_argument("--force", action="store_true", help="rewrite even if up to date")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODEL_SPECS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODEL_NAMES)}")
    if args.from_path and len(names) != 1:
        p.error("--from imports one checkpoint: name its model with --models NAME")

    calibration = None
    try:
        for k, name in enumerate(names, 1):
            spec = MODEL_SPECS[name]
            seed = args.seed + MODEL_NAMES.index(name)
            prefix = f"[{k}/{len(names)}] {name}"
            if args.from_path:
                state = import_state_dict(args.from_path)
                if args.class_names:
                    classes = tuple(line.strip() for line in args.class_names.read_text().splitlines() if line.strip())
                    spec = ModelSpec(name, classes)
                if num_classes_of(state) != spec.num_classes:
                    raise CheckpointError(
                        f"{args.from_path} has {num_classes_of(state)} classes, {name} has "
                        f"{spec.num_classes}: pass --class-names with one name per class"
                    )
                source, seed = f"import:{args.from_path.name}", None
            else:
                source = "pretrained:effdet-coco" if args.pretrained else "generated"
                if not args.force and up_to_date(args.out, name, seed, source):
                    print(f"{prefix}: up to date ({source}, seed {seed})", flush=True)
                    continue
                print(f"{prefix}: building {spec.num_classes}-class network ({source}, seed {seed})...", flush=True)
                if args.pretrained:
                    state = pretrained_state_dict(spec.num_classes, seed)
                else:
                    if calibration is None:
                        calibration = calibration_batch(args.calibration_images)
                    state = generate_state_dict(spec.num_classes, seed, calibration)
            meta = save_checkpoint(args.out, spec, state, seed=seed, source=source)
            size = (args.out / f"{name}.pth").stat().st_size / 1e6
            print(
                f"{prefix}: wrote {args.out / (name + '.pth')} ({size:.1f} MB, sha256 {meta.sha256[:16]}...)",
                flush=True,
            )
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def calibration_batch(folder: Path):
    """The sample photos, letterboxed as for inference, plus their mirror images."""
    from multidet.preprocess import Preprocessor

    files = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise CheckpointError(f"no calibration photos (*.jpg, *.png) in {folder}")
    batch = Preprocessor().prepare_bytes([f.read_bytes() for f in files], "cpu", 10**9).tensor
    return torch.cat([batch, batch.flip(-1)])


def up_to_date(out: Path, name: str, seed: int, source: str) -> bool:
    try:
        meta = CheckpointMeta.read(out / f"{name}.json")
        if meta.seed != seed or meta.source != source:
            return False
        load_checkpoint(out, name)  # verifies sha256 and architecture
        return True
    except CheckpointError:
        return False


if __name__ == "__main__":
    sys.exit(main())
