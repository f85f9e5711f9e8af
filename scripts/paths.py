"""Where a source checkout keeps things: the command lines' defaults. The package knows no checkout;
the scripts resolve these paths and pass them in."""

from __future__ import annotations

from pathlib import Path

from detlab.packaging import MarOptions
from detlab.server import Serving

ROOT = Path(__file__).resolve().parents[1]
HANDLER = ROOT / "handlers" / "efficientdet_handler.py"
MODEL_SET = ROOT / "models.yaml"  # the default model set: the shipped, trained models (weights/)
RANDOM_SET = ROOT / "checkpoints" / "models.yaml"  # the same models with seeded random weights (make checkpoints)
RECIPE = ROOT / "training.yaml"  # how the shipped models are trained
PHOTOS = ROOT / "load_tests" / "images"  # sample photos: benchmarks, synthetic backgrounds, INT8 calibration
CONFIG = ROOT / "config.properties"  # TorchServe's settings
OUTPUTS = ROOT / "outputs"


SERVING = Serving(HANDLER, MODEL_SET, CONFIG, PHOTOS)  # what the measuring scripts serve


def mar_options(**values) -> MarOptions:
    """MarOptions.of(...) with this checkout's handler, model set and calibration photos filled in."""
    return SERVING.mar(**values)
