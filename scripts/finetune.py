#!/usr/bin/env python
"""Fine-tune a detector on a COCO-format dataset (effdet's DetBenchTrain): any name, architecture and classes.

    # your own model, from one of the shipped ones (its class layer is re-initialised)
    python scripts/finetune.py --model pets --architecture efficientdet_d0 --classes-file classes.txt \\
        --train my_export/train --val my_export/valid --init models.yaml --init-model FIRST_MODEL \\
        --steps 1000 --out outputs/train/pets
    # a model of a model set (its architecture and classes from that file), from scratch
    python scripts/finetune.py --model NAME --model-set models.yaml \\
        --train data/NAME/train --val data/NAME/val --steps 2000 --image-size 256

A dataset folder holds images/ and annotations.json (COCO; category ids are the model's 1-based class
ids). Interrupted? Run the same command again: it resumes from OUT/<model>.train.pt. The result is a
one-model set: OUT/models.yaml (one entry, serve it with `make serve MODELS=OUT/models.yaml`, or copy
the entry into your own models file) and OUT/<model>.safetensors + .json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from detlab.training import BACKBONES, FROZEN, TrainConfig, train
from multidet.config import ConfigError
from multidet.modelset import read_model_set


def main(argv=None) -> int:
    d = TrainConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model's name ([a-z0-9_]+)")
    p.add_argument("--model-set", type=Path, help="take --model's architecture and classes from this models file")
    p.add_argument("--architecture", help="any effdet config name (default: the set's entry, else efficientdet_d0)")
    p.add_argument("--classes-file", type=Path, help="the class names, one a line, by class id")
    p.add_argument("--train", type=Path, required=True, help="training dataset folder (images/, annotations.json)")
    p.add_argument("--val", type=Path, help="validation dataset folder, evaluated with pycocotools")
    p.add_argument("--out", type=Path, default=d["out_dir"].default)
    p.add_argument("--init", type=Path, help="a model set (models file or a folder with models.yaml) to start from")
    p.add_argument("--init-model", help="which model of --init (default: --model)")
    for name in (
        "steps",
        "batch_size",
        "lr",
        "weight_decay",
        "image_size",
        "seed",
        "ema_decay",
        "workers",
        "eval_every",
        "eval_images",
        "save_every",
        "bn_recalibrate",
    ):
        default = d[name].default
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=f"default {default}")
    p.add_argument(
        "--amp",
        choices=("auto", "bf16", "off"),
        default="auto",
        help="bf16 autocast: auto = where the CPU has it natively (AMX/AVX-512 BF16) or on CUDA",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=d["scale"].default,
        metavar=("LO", "HI"),
        help="random scale, relative to the size objects have in the service's letterbox (default %(default)s)",
    )
    p.add_argument("--backbone-init", choices=sorted(BACKBONES), help="from scratch: an ImageNet backbone (a wheel)")
    p.add_argument(
        "--freeze",
        choices=sorted(FROZEN),
        default="none",
        help="keep this part of the --init model bit for bit (shared with it when served together: computed once)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        architecture, classes = identity(args)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = TrainConfig(
        model=args.model,
        architecture=architecture,
        class_names=classes,
        train_dir=args.train,
        val_dir=args.val,
        out_dir=args.out,
        init=args.init,
        init_model=args.init_model,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        image_size=args.image_size,
        seed=args.seed,
        ema_decay=args.ema_decay,
        amp=args.amp,
        device=args.device,
        workers=args.workers,
        eval_every=args.eval_every,
        eval_images=args.eval_images,
        save_every=args.save_every,
        bn_recalibrate=args.bn_recalibrate,
        scale=tuple(args.scale),
        backbone_init=args.backbone_init,
        freeze=args.freeze,
    )
    bars: list[tqdm] = []  # made at the first step, so a resumed run's rate and ETA count from there

    def progress(row: dict) -> None:
        if "final" in row:
            tqdm.write(
                f"final val ({row['final']['images']} images): mAP@0.5 {row['final']['map50']:.3f}  "
                f"mAP@[.5:.95] {row['final']['map']:.3f}"
            )
            return
        if not bars:
            bars.append(
                tqdm(
                    total=cfg.steps, initial=row["step"] - 1, desc=f"train {cfg.model}", unit="step", dynamic_ncols=True
                )
            )
        bar = bars[0]
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", cls=f"{row['class_loss']:.3f}", box=f"{row['box_loss']:.4f}")
        if "val" in row and row["val"]:
            tqdm.write(
                f"step {row['step']}: val mAP@0.5 {row['val']['map50']:.3f}  mAP@[.5:.95] "
                f"{row['val']['map']:.3f} ({row['val']['images']} images)"
            )

    try:
        result = train(cfg, progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for bar in bars:
            bar.close()
    meta = result.meta
    print(
        f"wrote {result.checkpoint_dir / meta.weights_file} (sha256 {meta.sha256[:16]}...) and "
        f"{result.checkpoint_dir / 'models.yaml'} after {meta.training['steps']} steps, {meta.training['wall_s']:.0f} s"
    )
    return 0


def identity(args) -> tuple[str, tuple[str, ...]]:
    """The model's architecture and class names: flags first, else its entry in --model-set."""
    architecture, classes = args.architecture, None
    if args.classes_file:
        classes = tuple(line.strip() for line in args.classes_file.read_text().splitlines() if line.strip())
    if args.model_set and (architecture is None or classes is None):
        model_set = read_model_set(args.model_set)
        if args.model not in model_set.names:
            raise ConfigError(f"{args.model} is not in {args.model_set} {list(model_set.names)}")
        entry = model_set[args.model]
        architecture = architecture or entry.architecture
        classes = classes or entry.class_names
    if not classes:
        raise ConfigError("the model's classes: give --classes-file, or --model-set with the model in it")
    return architecture or "efficientdet_d0", classes


if __name__ == "__main__":
    sys.exit(main())
