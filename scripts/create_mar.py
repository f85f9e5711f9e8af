#!/usr/bin/env python
"""Build model_store/all.mar: the handler, the multidet package, a model set (by default models.yaml:
the trained models in weights/) and a model-config.yaml for one optimization variant.

    python scripts/create_mar.py --optimization baseline
    python scripts/create_mar.py --optimization auto --model-set my_models.yaml
    python scripts/create_mar.py --optimization baseline --batch-size 4 --max-batch-delay 20

Every model of the set is checked first (names, architectures, weights' integrity and shapes, class
counts); an error names the file and the entry and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paths import HANDLER, MODEL_SET, PHOTOS, ROOT

from multidet.checkpoints import CheckpointError
from multidet.config import ConfigError, Settings
from multidet.optimizations import SERVABLE
from multidet.packaging import MarOptions, build_mar


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimization", default="baseline", choices=SERVABLE)
    p.add_argument("--model-name", default="all", help="endpoint name: /predictions/NAME (default all)")
    p.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    p.add_argument(
        "--model-set",
        type=Path,
        default=MODEL_SET,
        help="models file (default: models.yaml, the trained models; checkpoints/models.yaml: seeded random)",
    )
    p.add_argument(
        "--calibration-photos", type=Path, default=PHOTOS, help="INT8 calibration backgrounds (load_tests/images)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--threshold", type=float, default=Settings.threshold)
    p.add_argument("--max-detections", type=int, default=Settings.max_detections)
    p.add_argument("--max-image-pixels", type=int, default=Settings.max_image_pixels)
    p.add_argument("--max-instances", type=int, default=Settings.max_instances, help="images per request (KServe v1)")
    p.add_argument("--models", default="", help="comma-separated subset of the set's models (default: all)")
    p.add_argument(
        "--allow-reduced",
        action="store_true",
        help="auto may serve bf16/fp16 when its mAP is within 0.5 points of the baseline's",
    )
    p.add_argument(
        "--profile", action="store_true", help="TorchServe's handler timing metrics (ts_handler_*; handler.profile)"
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
        settings = Settings(
            optimization=args.optimization,
            device=args.device,
            threshold=args.threshold,
            max_detections=args.max_detections,
            max_image_pixels=args.max_image_pixels,
            max_instances=args.max_instances,
            models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
            allow_reduced=args.allow_reduced,
            profile=args.profile,
        )
        options = MarOptions(
            settings=settings,
            model_set=args.model_set,
            handler=HANDLER,
            calibration_photos=args.calibration_photos,
            model_name=args.model_name,
            workers=args.workers,
            batch_size=args.batch_size,
            max_batch_delay=args.max_batch_delay,
            response_timeout=args.response_timeout,
            startup_timeout=args.startup_timeout,
            device_ids=tuple(int(i) for i in args.device_ids.split(",")) if args.device_ids else (),
        )
        build_mar(options, args.export_path, log=lambda line: print(line, flush=True))
    except (ConfigError, CheckpointError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
