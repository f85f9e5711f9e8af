"""Helpers shared by the tests (a module, not fixtures): the trained weights, a labelled check set,
and "the same answer" (multidet.quality) as assertions."""
from __future__ import annotations

from pathlib import Path

from multidet.config import Settings
from multidet.quality import RULES, SERVING_THRESHOLD, check_detections, coco_map, map_ok

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"            # the trained checkpoints, shipped in git
TRAINED = Settings(checkpoint_dir="weights")  # EmbeddedService(TRAINED): what `make serve` serves


def answers(detector, bodies, **kw) -> list[list[dict]]:
    """Every model's detections at threshold 0 (for mAP; the rule applies the serving threshold)."""
    from multidet.pipeline import RequestOptions

    out = detector.predict(list(bodies), [RequestOptions(threshold=0.0, **kw)] * len(bodies))
    return [r["detections"] for r in out]


def map50(answer: list[list[dict]], truth: dict[str, dict]) -> dict[str, float]:
    """mAP@0.5 per model of per-image answers against ``synthetic.check_set`` ground truth."""
    out = {}
    for model, gt in truth.items():
        results = [{"image_id": i + 1, "category_id": d["class_id"], "score": d["score"],
                    "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]]}
                   for i, dets in enumerate(answer) for d in dets if d["model"] == model]
        out[model] = coco_map(gt, results)[0]
    return out


def assert_same_answer(reference: list[dict], candidate: list[dict], tier: str = "exact",
                       threshold: float = SERVING_THRESHOLD) -> None:
    """One image: the candidate's detections are the reference's under ``tier``'s rule."""
    rule = RULES[tier]
    check = check_detections(reference, candidate, threshold, rule)
    assert check.ok(rule), check


def assert_same_map(reference: dict[str, float], candidate: dict[str, float], tier: str = "exact") -> None:
    for model, base in reference.items():
        assert map_ok(base, candidate[model], RULES[tier]), (model, base, candidate[model], tier)
