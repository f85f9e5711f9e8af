"""Shared fixtures: real photos, the seeded and the trained checkpoints, a labelled check set, the core
Detector, and a real TorchServe (serving the trained weights, as `make serve` does)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import WEIGHTS, answers
from multidet.config import MODEL_NAMES, Settings
from multidet.pipeline import Detector
from multidet.server import BIN, free_ports, start_torchserve  # noqa: F401  (tests import them from here)
from multidet.tsconfig import read_properties  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "load_tests" / "images"
CHECKPOINTS = ROOT / "checkpoints"
PHOTOS = sorted(IMAGES.glob("*.jpg"))


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    assert len(PHOTOS) >= 3, f"expected the sample photos in {IMAGES}"
    return {p.stem: p.read_bytes() for p in PHOTOS}


@pytest.fixture(scope="session")
def detector() -> Detector:
    """The seeded random checkpoints: for tests of arithmetic (raw outputs, effdet equality), not answers."""
    if not (CHECKPOINTS / f"{MODEL_NAMES[0]}.json").exists():
        pytest.fail("checkpoints missing: run `make checkpoints` (make test does it)")
    return Detector.from_checkpoints(CHECKPOINTS, Settings(), torch.device("cpu"))


@pytest.fixture(scope="session")
def trained() -> Detector:
    """The shipped trained checkpoints (weights/): their detections are confident, so answers compare."""
    return Detector.from_checkpoints(WEIGHTS, Settings(), torch.device("cpu"))


@pytest.fixture(scope="session")
def labelled():
    """Eight labelled images made in memory (multidet.synthetic.check_set): (JPEG bytes, ground truth
    per model), every model's objects annotated with its own class ids."""
    from multidet.synthetic import check_set

    return check_set(count=8, seed=7)


@pytest.fixture(scope="session")
def labelled_reference(trained, labelled):
    """The baseline's answer (threshold 0) on the labelled images, per image."""
    return answers(trained, labelled[0])


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


SCHEMA_KEYS = {"image", "optimization", "device", "detections", "models", "timing_ms"}


def assert_schema(result: dict, models=MODEL_NAMES) -> None:
    """The response schema of the README, checked field by field."""
    assert set(result) == SCHEMA_KEYS
    w, h = result["image"]["width"], result["image"]["height"]
    assert isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
    assert isinstance(result["optimization"], str) and isinstance(result["device"], str)
    assert [m["name"] for m in result["models"]] == list(models)
    for m in result["models"]:
        assert set(m) == {"name", "num_classes", "count"}
        assert m["count"] == sum(d["model"] == m["name"] for d in result["detections"])
    scores = [d["score"] for d in result["detections"]]
    assert scores == sorted(scores, reverse=True), "detections must be score-descending"
    for d in result["detections"]:
        assert set(d) == {"model", "class_id", "label", "score", "box"}
        assert isinstance(d["class_id"], int) and isinstance(d["label"], str) and 0.0 <= d["score"] <= 1.0
        x1, y1, x2, y2 = d["box"]
        assert all(isinstance(v, float) for v in d["box"])
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, d
    assert set(result["timing_ms"]) == {"decode", "preprocess", "inference", "postprocess", "total"}
    assert all(v >= 0 for v in result["timing_ms"].values())


# -- a real TorchServe: multidet.server.start_torchserve (imported above) ------------------------
@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The suite's main TorchServe (baseline). batchSize 4: single requests and concurrent batches
    are both exercised by the same server."""
    ts = start_torchserve(tmp_path_factory.mktemp("torchserve"),
                          ["--optimization", "baseline", "--batch-size", "4", "--max-batch-delay", "200"])
    yield ts
    ts.stop()
