#!/usr/bin/env python
"""Print the server's JSON for one image, computed in-process (embedded mode, same handler path).

python scripts/predict.py load_tests/images/coffee.jpg --threshold 0 [--models NAME,NAME] [--model-set my.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from paths import HANDLER, MODEL_SET

from detlab.embedded import EmbeddedService
from multidet.config import ConfigError, Settings
from multidet.optimizations import SERVABLE


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", type=Path)
    p.add_argument("--optimization", default="baseline", choices=SERVABLE)
    p.add_argument("--device", default="auto")
    p.add_argument("--threshold", help="score threshold 0..1 (default: the model config's)")
    p.add_argument("--models", help="comma-separated subset of the model names")
    p.add_argument(
        "--model-set",
        type=Path,
        default=MODEL_SET,
        help="models file (default: models.yaml, the trained models; checkpoints/models.yaml: the seeded random ones)",
    )
    args = p.parse_args(argv)

    try:
        settings = Settings(
            optimization=args.optimization, device=args.device, warmup=False, model_set=args.model_set.name
        )
    except ConfigError as exc:
        p.error(str(exc))
    logging.getLogger("ts.torch_handler.base_handler").setLevel(logging.ERROR)  # optional-backend notices
    service = EmbeddedService(settings, args.model_set.resolve().parent, HANDLER)
    params = {k: v for k, v in (("threshold", args.threshold), ("models", args.models)) if v is not None}
    response = service.predict_one(args.image.read_bytes(), params)
    print(json.dumps(response.body, indent=2))
    return 0 if response.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
