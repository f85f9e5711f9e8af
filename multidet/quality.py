"""One definition of "the same answer", by precision tier. Each path declares its tier (``Runner.tier``)
and ``auto``, the tests and the ablation judge it with the rule here.

exact (fp32 paths: other kernels, layouts, grouping, runtimes)
    on labelled images at the serving threshold (0.5): the baseline's detections, one to one (same
    model, label, IoU >= 0.5): same count and labels, boxes within 0.5 px, scores within 1e-3;
    and mAP within 0.1 points (0.001) of the baseline's.
reduced (bf16, fp16, INT8)
    mAP at most 0.5 points (0.005) below the baseline's. Detections may move.
random weights (unit tests, no training)
    raw network outputs (class logits, box regressions) within the path's ``raw_tolerance``,
    relative to the largest baseline output of that tensor: ties are not errors there.

Near-ties, which no fp32 path can promise to break the same way, are not errors either:
- a detection whose score is within ``score_tol`` of the threshold may be on either side of it;
- two overlapping boxes of one class whose scores tie within float noise may swap in NMS: the kept
  box is the neighbour's (IoU >= 0.8 with the baseline's, score within float noise, 1e-5). At most
  ``max(1, 1 %)`` of the matched detections may be such swaps. From the answer alone one such pair
  cannot be told from one slightly moved box; a systematic box error (more than that) fails.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .compare import iou

SERVING_THRESHOLD = 0.5
TIE = 1e-5  # two scores this close are a tie to fp32 paths that reassociate sums (measured ~1e-6)


@dataclass(frozen=True)
class Rule:
    tier: str
    box_tol: float | None  # px; None: detections are not compared one to one (reduced tier)
    score_tol: float
    map_tol: float  # exact: |delta mAP| <= map_tol; reduced: baseline - candidate <= map_tol


RULES = {
    "exact": Rule("exact", box_tol=0.5, score_tol=1e-3, map_tol=0.001),
    "reduced": Rule("reduced", box_tol=None, score_tol=1e-3, map_tol=0.005),
}
TIERS = tuple(RULES)


@dataclass
class DetectionCheck:
    reference: int  # baseline detections at the threshold (borderline ones included)
    candidate: int
    matched: int
    missing: int  # baseline detections without a partner (borderline ones excused)
    extra: int  # candidate detections without a partner (borderline ones excused)
    max_box_diff: float  # px, over matched pairs that are not NMS swaps
    max_score_diff: float
    swaps: int  # matched pairs that are NMS near-tie swaps

    def ok(self, rule: Rule) -> bool:
        if rule.box_tol is None:
            return True
        return (
            self.missing == 0
            and self.extra == 0
            and self.max_box_diff <= rule.box_tol
            and self.max_score_diff <= rule.score_tol
            and self.swaps <= max(1, self.matched // 100)
        )


def check_detections(
    reference: Sequence[dict],
    candidate: Sequence[dict],
    threshold: float = SERVING_THRESHOLD,
    rule: Rule = RULES["exact"],
) -> DetectionCheck:
    """Compare two answers (response "detections" lists) at ``threshold`` under ``rule``."""
    box_tol = rule.box_tol if rule.box_tol is not None else float("inf")
    ref = sorted((d for d in reference if d["score"] >= threshold - rule.score_tol), key=lambda d: -d["score"])
    cand = [d for d in candidate if d["score"] >= threshold - rule.score_tol]
    border = lambda d: abs(d["score"] - threshold) <= rule.score_tol  # noqa: E731
    used: set[int] = set()
    missing = matched = swaps = 0
    box_diff = score_diff = 0.0
    for r in ref:
        best, best_iou = None, 0.5
        for j, c in enumerate(cand):
            if j in used or c["model"] != r["model"] or c["class_id"] != r["class_id"]:
                continue
            overlap = iou(r["box"], c["box"])
            if overlap >= best_iou:
                best, best_iou = j, overlap
        if best is None:
            missing += 0 if border(r) else 1
            continue
        used.add(best)
        c = cand[best]
        matched += 1
        ds = abs(r["score"] - c["score"])
        db = max(abs(a - b) for a, b in zip(r["box"], c["box"]))
        score_diff = max(score_diff, ds)
        if db > box_tol and best_iou >= 0.8 and ds <= TIE:
            swaps += 1
        else:
            box_diff = max(box_diff, db)
    extra = sum(1 for j, c in enumerate(cand) if j not in used and not border(c))
    return DetectionCheck(
        reference=len(ref),
        candidate=len(cand),
        matched=matched,
        missing=missing,
        extra=extra,
        max_box_diff=box_diff,
        max_score_diff=score_diff,
        swaps=swaps,
    )


def map_ok(baseline_map: float, candidate_map: float, rule: Rule) -> bool:
    if rule.tier == "exact":
        return abs(candidate_map - baseline_map) <= rule.map_tol + 1e-9
    return baseline_map - candidate_map <= rule.map_tol + 1e-9


def raw_difference(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> float:
    """Largest |difference| of raw outputs, relative to the largest |reference| output of its tensor."""
    worst = 0.0
    for a, b in zip(reference, candidate, strict=True):
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        if a.shape != b.shape:
            raise ValueError(f"raw output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        worst = max(worst, float((a - b).abs().max()) / max(float(a.abs().max()), 1e-6))
    return worst


def coco_results(answer: Sequence[Sequence[dict]], model: str) -> list[dict]:
    """Per-image response detections (image i has id i + 1) -> one model's COCO results for coco_map."""
    return [
        {
            "image_id": i + 1,
            "category_id": d["class_id"],
            "score": d["score"],
            "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]],
        }
        for i, dets in enumerate(answer)
        for d in dets
        if d["model"] == model
    ]


def coco_map(coco_gt: dict, results: list[dict]) -> tuple[float, float]:
    """(mAP@0.5, mAP@[.5:.95]) of ``results`` (COCO result dicts) against ground truth ``coco_gt``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = coco_gt
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = [img["id"] for img in coco_gt["images"]]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[1]), 0.0), max(float(ev.stats[0]), 0.0)
