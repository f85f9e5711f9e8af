#!/usr/bin/env python
"""Build model_store/all.mar: the handler, the multidet package, a model set (by default models.yaml:
the trained models in weights/) and a model-config.yaml for one optimization variant.

    python scripts/create_mar.py --optimization baseline
    python scripts/create_mar.py --optimization auto --model-set my_models.yaml
    python scripts/create_mar.py --optimization baseline --batch-size 4 --max-batch-delay 20
    python scripts/create_mar.py --threshold 0.4 --decode-deadline-s 5 --set max_instances=4   # any setting

Every model of the set is checked first (names, architectures, weights' integrity and shapes, class
counts); an error names the file and the entry and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paths import HANDLER, MODEL_SET, PHOTOS, ROOT

from detlab.packaging import MarOptions, build_mar
from multidet.config import ConfigError, Settings, add_setting_flags, setting_values
from multidet.optimizations import SERVABLE
from multidet.weights import CheckpointError


def parser() -> argparse.ArgumentParser:
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
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-batch-delay", type=int, default=50, help="ms TorchServe waits to fill a batch")
    p.add_argument("--response-timeout", type=int, default=120, help="s per inference before the worker is reset")
    p.add_argument("--startup-timeout", type=int, default=600, help="s for load + warm-up")
    p.add_argument(
        "--device-ids", default=None, help="GPUs this model's workers may use, e.g. 0,1 (TorchServe deviceIds)"
    )
    # every setting of the runtime (the handler's model-config.yaml section), derived from Settings; the archive
    # fixes where its model set and build files lie
    add_setting_flags(p, [Settings], skip=("model_set", "artifact_dir"))
    return p


def mar_options(args: argparse.Namespace) -> MarOptions:
    """The archive's options from the command line (a wrong setting: ConfigError naming it)."""
    return MarOptions(
        settings=Settings.from_mapping({"optimization": args.optimization, **setting_values(args)}),
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


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        build_mar(mar_options(args), args.export_path, log=lambda line: print(line, flush=True))
    except (ConfigError, CheckpointError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
