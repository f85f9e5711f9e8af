"""Helpers shared by the tests (a module, not fixtures): the trained weights, a labelled check set,
and "the same answer" (multidet.quality) as assertions."""

from __future__ import annotations

import io
import struct
from dataclasses import replace
from pathlib import Path

from PIL import Image

from detlab.embedded import EmbeddedService
from detlab.packaging import MarOptions
from detlab.server import BIN, Serving, free_ports, start_torchserve  # noqa: F401  (re-exported for the tests)
from multidet.config import Settings
from multidet.modelset import read_model_set
from multidet.quality import RULES, SERVING_THRESHOLD, check_detections, coco_map, coco_results, map_ok
from multidet.tsconfig import read_properties  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "load_tests" / "images"
PHOTOS = sorted(IMAGES.glob("*.jpg"))
HANDLER = ROOT / "handlers" / "efficientdet_handler.py"
CONFIG = ROOT / "config.properties"
SHIPPED = ROOT / "models.yaml"  # the default model set: the trained models, shipped in git (weights/)
WEIGHTS = ROOT / "weights"
CHECKPOINTS = ROOT / "checkpoints"  # the same models with seeded random weights (make checkpoints)
RANDOM = CHECKPOINTS / "models.yaml"  # arithmetic tests
NAMES = read_model_set(SHIPPED).names  # the default set's model names, in order
TRAINED = Settings()  # what `make serve` serves (the default set)
SERVING = Serving(HANDLER, SHIPPED, CONFIG, IMAGES)  # this checkout's handler, default set, config, photos


def data_spec(name: str):
    """What the training recipe (training.yaml) makes labelled data of for the default set's model ``name``."""
    from detlab.recipe import data_spec as spec
    from detlab.recipe import read_recipe

    model_set = read_model_set(SHIPPED)
    return spec(read_recipe(ROOT / "training.yaml", model_set), model_set, name)


def mar_options(**values) -> MarOptions:
    """MarOptions.of(...) for this checkout: its handler, the default model set, the calibration photos."""
    return SERVING.mar(**values)


def start(workdir, mar: MarOptions | None = None, extra: dict | None = None, **kw):
    """A real TorchServe from the repo's config.properties, serving ``mar`` (default: the shipped set, baseline)."""
    return start_torchserve(workdir, mar or mar_options(), CONFIG, extra, **kw)


def embedded(settings: Settings = TRAINED, model_set: Path = SHIPPED, **kw) -> EmbeddedService:
    """The handler in-process on ``model_set`` (default: the shipped set)."""
    return EmbeddedService(replace(settings, model_set=model_set.name), model_set.parent, HANDLER, **kw)


def answers(detector, bodies, **kw) -> list[list[dict]]:
    """Every model's detections at threshold 0 (for mAP; the rule applies the serving threshold)."""
    from multidet.pipeline import RequestOptions

    out = detector.predict(list(bodies), [RequestOptions(threshold=0.0, **kw)] * len(bodies))
    return [r["detections"] for r in out]


def map50(answer: list[list[dict]], truth: dict[str, dict]) -> dict[str, float]:
    """mAP@0.5 per model of per-image answers against ``synthetic.check_set`` ground truth."""
    return {model: coco_map(gt, coco_results(answer, model))[0] for model, gt in truth.items()}


def assert_same_answer(
    reference: list[dict], candidate: list[dict], tier: str = "exact", threshold: float = SERVING_THRESHOLD
) -> None:
    """One image: the candidate's detections are the reference's under ``tier``'s rule."""
    rule = RULES[tier]
    check = check_detections(reference, candidate, threshold, rule)
    assert check.ok(rule), check


def assert_same_map(reference: dict[str, float], candidate: dict[str, float], tier: str = "exact") -> None:
    for model, base in reference.items():
        assert map_ok(base, candidate[model], RULES[tier]), (model, base, candidate[model], tier)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


SCHEMA_KEYS = {"image", "optimization", "device", "detections", "models", "timing_ms"}


def assert_schema(result: dict, models=NAMES) -> None:
    """The response schema of the README, checked field by field."""
    assert set(result) - {"request_id"} == SCHEMA_KEYS  # request_id: a front's answer (the Detector's has none)
    w, h = result["image"]["width"], result["image"]["height"]
    assert isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
    assert isinstance(result["optimization"], str) and isinstance(result["device"], str)
    assert [m["name"] for m in result["models"]] == list(models)
    for m in result["models"]:
        assert set(m) == {"name", "num_classes", "count", "inference_ms"} and m["inference_ms"] >= 0
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


def jpeg_declaring(photo: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose SOF header is patched to declare another size (a decompression bomb)."""
    data = bytearray(photo)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        i = data.find(marker)
        if i >= 0:
            struct.pack_into(">HH", data, i + 5, height, width)
            return bytes(data)
    raise AssertionError("no SOF marker")


BAD_INPUTS = ("empty", "text", "html", "truncated", "garbage_jpeg", "bomb", "threshold", "models")


def bad_input(photos: dict[str, bytes], case: str) -> tuple[bytes, dict[str, str], int]:
    """One kind of bad request for /predictions/all: its body, headers and the status every front answers."""
    body, headers, content_type, status = {
        "empty": (b"", {}, None, 400),
        "text": (b"just some text", {}, "text/plain", 415),
        "html": (b"<html><body>hi</body></html>", {}, "text/html", 415),
        "truncated": (photos["coffee"][:3000], {}, "image/jpeg", 422),
        "garbage_jpeg": (b"\xff\xd8\xff\xe0" + b"\x00garbage" * 100, {}, "image/jpeg", 422),
        "bomb": (jpeg_declaring(photos["chelsea"], 30000, 30000), {}, "image/jpeg", 413),
        "threshold": (photos["coffee"], {"X-Threshold": "2"}, None, 400),
        "models": (photos["coffee"], {"X-Models": "unknown"}, None, 400),
    }[case]
    if content_type:
        headers = {**headers, "Content-Type": content_type}
    return body, headers, status
