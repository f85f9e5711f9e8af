"""Shared fixtures: real photos, the seeded and the trained checkpoints, a labelled check set, the core
Detector, and a real TorchServe (serving the trained weights, as `make serve` does)."""

from __future__ import annotations

import os
import shutil
import tempfile

# Hermetic caches: every cache the project and its libraries write (OpenVINO IR builds and compiled blobs,
# Inductor and Triton kernels) goes to a folder made for this test session and removed after it, set before
# anything imports torch, so TorchServe workers and Ray nodes started by the tests inherit it. Nothing a test
# asserts on comes from an earlier run's files in the home folder.
SESSION_CACHE = tempfile.mkdtemp(prefix="multidet-tests-cache-")
CACHES = {"MULTIDET_CACHE_DIR": "multidet", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}
for variable, folder in CACHES.items():
    os.environ[variable] = os.path.join(SESSION_CACHE, folder)

import pytest  # noqa: E402  (after the cache variables above)
import torch  # noqa: E402

from helpers import IMAGES, PHOTOS, RANDOM, SHIPPED, answers, mar_options, start  # noqa: E402
from multidet.config import Settings  # noqa: E402
from multidet.pipeline import Detector  # noqa: E402


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    assert len(PHOTOS) >= 3, f"expected the sample photos in {IMAGES}"
    return {p.stem: p.read_bytes() for p in PHOTOS}


@pytest.fixture(scope="session")
def detector() -> Detector:
    """The seeded random checkpoints: for tests of arithmetic (raw outputs, effdet equality), not answers."""
    if not RANDOM.exists():
        pytest.fail("checkpoints missing: run `make checkpoints` (make test does it)")
    return Detector.from_model_set(RANDOM, Settings(), torch.device("cpu"))


@pytest.fixture(scope="session")
def trained() -> Detector:
    """The shipped trained checkpoints (weights/): their detections are confident, so answers compare."""
    return Detector.from_model_set(SHIPPED, Settings(), torch.device("cpu"))


@pytest.fixture(scope="session")
def labelled(trained):
    """Eight labelled images made in memory (detlab.synthetic.check_set): (JPEG bytes, ground truth
    per model), every model's objects annotated with its own class ids."""
    from detlab.synthetic import DataSpec, check_set

    return check_set(count=8, seed=7, specs=[DataSpec.of(m) for m in trained.models])


@pytest.fixture(scope="session")
def labelled_reference(trained, labelled):
    """The baseline's answer (threshold 0) on the labelled images, per image."""
    return answers(trained, labelled[0])


# -- a real TorchServe ------------------------
@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The suite's main TorchServe (baseline). batchSize 4: single requests and concurrent batches
    are both exercised by the same server."""
    ts = start(
        tmp_path_factory.mktemp("torchserve"),
        mar_options(optimization="baseline", batch_size=4, max_batch_delay=200),
    )
    yield ts
    ts.stop()


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)
