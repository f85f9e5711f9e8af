#!/usr/bin/env python
"""Build model_store/all.mar: the handler, the multidet package, the three checkpoints (by default
the trained ones in weights/) and a model-config.yaml for one optimisation variant.

    python scripts/create_mar.py --optimization baseline
    python scripts/create_mar.py --optimization baseline --batch-size 4 --max-batch-delay 20
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from multidet.checkpoints import CheckpointError, load_checkpoint
from multidet.config import MODEL_NAMES, ConfigError, Settings
from multidet.runners import RUNNERS, SERVABLE, LoadedModel

ROOT = Path(__file__).resolve().parents[1]


def model_config(args) -> dict:
    settings = Settings(
        optimization=args.optimization,
        device=args.device,
        threshold=args.threshold,
        max_detections=args.max_detections,
        max_image_pixels=args.max_image_pixels,
        models=tuple(args.models.split(",")),
        allow_reduced=args.allow_reduced,
    )
    return {
        "minWorkers": args.workers,
        "maxWorkers": args.workers,
        "batchSize": args.batch_size,
        "maxBatchDelay": args.max_batch_delay,
        "responseTimeout": args.response_timeout,
        "startupTimeout": args.startup_timeout,
        **({"deviceIds": [int(i) for i in args.device_ids.split(",")]} if args.device_ids else {}),
        "handler": settings.to_mapping(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimization", default="baseline", choices=SERVABLE)
    p.add_argument("--model-name", default="all", help="endpoint name: /predictions/NAME (default all)")
    p.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    p.add_argument(
        "--checkpoints",
        type=Path,
        default=ROOT / "weights",
        help="default: weights (the trained models); checkpoints = the seeded random ones",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--threshold", type=float, default=Settings.threshold)
    p.add_argument("--max-detections", type=int, default=Settings.max_detections)
    p.add_argument("--max-image-pixels", type=int, default=Settings.max_image_pixels)
    p.add_argument("--models", default=",".join(MODEL_NAMES))
    p.add_argument(
        "--allow-reduced",
        action="store_true",
        help="auto may serve bf16/fp16 when its mAP is within 0.5 points of the baseline's",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-batch-delay", type=int, default=50, help="ms TorchServe waits to fill a batch")
    p.add_argument("--response-timeout", type=int, default=120, help="s per inference before the worker is reset")
    p.add_argument("--startup-timeout", type=int, default=600, help="s for load + warm-up")
    p.add_argument(
        "--device-ids", default=None, help="GPUs this model's workers may use, e.g. 0,1 (TorchServe deviceIds)"
    )
    args = p.parse_args(argv)

    try:
        config = model_config(args)
        models, files = [], []
        for name in config["handler"]["models"]:
            meta, net = load_checkpoint(args.checkpoints, name)  # sha256 + architecture, before packing
            models.append(LoadedModel(name, tuple(meta.class_names), net))
            files += [args.checkpoints / meta.weights_file, args.checkpoints / f"{name}.json"]
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mar-") as tmp:
        extra = Path(tmp) / "extra"
        shutil.copytree(ROOT / "multidet", extra / "multidet", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (extra / "checkpoints").mkdir()
        for path in files:
            shutil.copy2(path, extra / "checkpoints")
        built = RUNNERS[args.optimization].build(models, extra / config["handler"]["artifact_dir"])
        for path in built:
            print(f"built {path.name} for {args.optimization} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        args.export_path.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(Path(sys.executable).with_name("torch-model-archiver")),
            "--model-name",
            args.model_name,
            "--version",
            "1.0",
            "--handler",
            str(ROOT / "handlers" / "efficientdet_handler.py"),
            "--extra-files",
            str(extra),
            "--config-file",
            str(config_file),
            "--export-path",
            str(args.export_path),
            "--force",
        ]
        print(
            f"packing {args.model_name}.mar (optimization={args.optimization}, batchSize={args.batch_size})...",
            flush=True,
        )
        subprocess.run(cmd, check=True)
    mar = args.export_path / f"{args.model_name}.mar"
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
