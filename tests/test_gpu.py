"""CUDA paths. On a machine without CUDA only the first test runs (the CUDA-only path is refused
cleanly); the rest are skipped. scripts/gpu_check.sh runs this file on a GPU machine.

On CUDA, cuDNN runs fp32 convolutions in TF32 by default (PyTorch's setting, kept: it is what a
deployment gets), so optimizations that use other kernels agree with the CUDA baseline to TF32 precision:
>= 97 % of detections matched, boxes within 0.5 px, scores within 1e-3 (the bounds used for
ONNX Runtime and Inductor on CPU). The figures measured are in docs/benchmarks.md.
"""

from __future__ import annotations

import pytest
import torch

from helpers import RANDOM, assert_schema
from multidet.config import Settings
from multidet.optimizations import OPTIMIZATIONS, create_optimization, list_optimizations
from multidet.pipeline import Detector, RequestOptions
from multidet.quality import agreement

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
# every exact optimization that runs on CUDA (from the registry), compared with the CUDA baseline
CUDA_EXACT = [
    n
    for n in list_optimizations(device="cuda", tier="exact", servable=True, distinct=True)
    if n != "baseline" and not OPTIMIZATIONS[n].chooses
]
ZERO = RequestOptions(threshold=0.0)


def test_cuda_graphs_is_refused_cleanly_without_cuda(detector):
    if CUDA:
        pytest.skip("CUDA present: the path runs (tests below)")
    assert not OPTIMIZATIONS["cuda_graphs"].supports(torch.device("cpu"))
    with pytest.raises(ValueError, match="does not run on cpu"):
        create_optimization("cuda_graphs", detector.models, "cpu")


def cuda_detector(name: str) -> Detector:
    return Detector.from_model_set(RANDOM, Settings(optimization=name), torch.device("cuda:0"))


@pytest.fixture(scope="module")
def cuda_reference(photos):
    if not CUDA:
        pytest.skip("no CUDA device")
    det = cuda_detector("baseline")
    return {img: det.predict_one(body, ZERO)["detections"] for img, body in photos.items()}


def assert_close(reference, candidate, min_matched=0.97, box_tol=0.5, score_tol=1e-3):
    a = agreement(reference, candidate)
    assert a.label_agreement >= min_matched, a
    assert a.max_box_diff <= box_tol and a.max_score_diff <= score_tol, a


@needs_cuda
def test_cuda_baseline_agrees_with_cpu(detector, photos, cuda_reference):
    for img, body in photos.items():
        assert_close(detector.predict_one(body, ZERO)["detections"], cuda_reference[img])


@needs_cuda
@pytest.mark.parametrize("name", CUDA_EXACT)
def test_cuda_path_equals_cuda_baseline(name, photos, cuda_reference):
    det = cuda_detector(name)
    for img, body in photos.items():
        got = det.predict_one(body, ZERO)
        assert_schema(got)
        assert got["device"] == "cuda:0" and got["optimization"] == name
        assert_close(cuda_reference[img], got["detections"])


@needs_cuda
def test_cuda_graphs_batches_replay_one_graph_per_shape(photos, cuda_reference):
    det = cuda_detector("cuda_graphs")
    bodies = list(photos.values())
    for _ in range(2):
        results = det.predict(bodies[:2], [ZERO, ZERO])
        for img, result in zip(list(photos)[:2], results):
            assert_close(cuda_reference[img], result["detections"])
    det.predict_one(bodies[0], ZERO)
    graphs = det.optimization.graphs
    assert sorted(shape[0][0] for shape in graphs) == [1, 2]
    assert {shape[0][0]: c.replays for shape, c in graphs.items()} == {1: 1, 2: 2}


@needs_cuda
@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_cuda_half_precision_quality(name, photos, cuda_reference):
    """Reduced precision is not exact: measured and held to the issue's bar where it can be."""
    if not OPTIMIZATIONS[name].supports(torch.device("cuda:0")):
        pytest.skip(f"{name} not supported on this GPU")
    det = cuda_detector(name)
    for img, body in photos.items():
        a = agreement(cuda_reference[img], det.predict_one(body, ZERO)["detections"])
        assert a.matched > 0 and a.mean_iou > 0.5, a


@needs_cuda
def test_auto_on_cuda_picks_an_equal_path(photos, cuda_reference):
    det = cuda_detector("auto")
    table = {row["optimization"]: row for row in det.optimization.table}
    assert "cuda_graphs" in table and table[det.optimization.chosen.name]["equal"]
    assert_close(cuda_reference["coffee"], det.predict_one(photos["coffee"], ZERO)["detections"])
