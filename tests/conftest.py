"""Shared fixtures: real photos, the seeded and the trained checkpoints, a labelled check set, the core
Detector, and a real TorchServe (serving the trained weights, as `make serve` does)."""

from __future__ import annotations

import pytest
import torch

from helpers import CHECKPOINTS, IMAGES, PHOTOS, WEIGHTS, answers
from multidet.config import MODEL_NAMES, Settings
from multidet.packaging import MarOptions
from multidet.pipeline import Detector
from multidet.server import start_torchserve


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


# -- a real TorchServe ------------------------
@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The suite's main TorchServe (baseline). batchSize 4: single requests and concurrent batches
    are both exercised by the same server."""
    ts = start_torchserve(
        tmp_path_factory.mktemp("torchserve"),
        MarOptions.of(optimization="baseline", batch_size=4, max_batch_delay=200),
    )
    yield ts
    ts.stop()
