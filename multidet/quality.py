"""One definition of "the same answer", by precision tier. Each optimization declares its tier (``Optimization.tier``)
and ``auto``, the tests and the ablation judge it with the rule here.

exact (fp32 paths: other kernels, layouts, grouping, runtimes)
    on labelled images at the serving threshold (0.5): the baseline's detections, one to one (same
    model, label, IoU >= 0.5): same count and labels, boxes within 0.5 px, scores within 1e-3;
    and mAP within 0.1 points (0.001) of the baseline's.
reduced (bf16, fp16, INT8)
    mAP at most 0.5 points (0.005) below the baseline's. Detections may move.
random weights (unit tests, no training)
    raw network outputs (class logits, box regressions) within the optimization's ``raw_tolerance``,
    relative to the largest baseline output of that tensor: ties are not errors there.

Boxes within 0.5 px on every coordinate are the same box whatever their IoU (a box of almost no height has
an IoU with itself that float noise decides). Near-ties, which no fp32 path can promise to break the same
way, are not errors either:
- a detection whose score is within ``score_tol`` of the threshold may be on either side of it;
- two overlapping boxes of one class whose scores tie within float noise may swap in NMS: the kept
  box is the neighbour's (IoU >= 0.8 with the baseline's, score within float noise, 1e-5). At most
  ``max(1, 1 %)`` of the matched detections may be such swaps. From the answer alone one such pair
  cannot be told from one slightly moved box; a systematic box error (more than that) fails.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import Settings

SERVING_THRESHOLD = Settings.threshold  # the service's default score threshold (one source: Settings)
TIE = 1e-5  # two scores this close are a tie to fp32 optimizations that reassociate sums (measured ~1e-6)


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


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


NEAR_PX = 0.5  # boxes whose every coordinate is this close are one box, whatever their IoU


def overlap_of(a, b) -> float:
    """IoU, except that boxes within ``NEAR_PX`` on every coordinate count as 1: a box of (almost) no height
    or width has an IoU with itself that float noise decides (measured: a 0.04 px high box at score 0.998
    on a val image, its IoU with the same box 0.005 px lower below 0.5 on an exact fp32 path)."""
    if max(abs(x - y) for x, y in zip(a, b)) <= NEAR_PX:
        return 1.0
    return iou(a, b)


def match(reference: Sequence[dict], candidate: Sequence[dict], min_iou: float = 0.5) -> list[tuple[int, int, float]]:
    """The one matcher: (reference index, candidate index, IoU) pairs, one to one, same model and label,
    greedily in the reference's score order; each takes the free candidate of highest IoU >= ``min_iou``
    (the first of equals; boxes within ``NEAR_PX`` count as IoU 1)."""
    used: set[int] = set()
    pairs = []
    for i in sorted(range(len(reference)), key=lambda i: -reference[i]["score"]):
        r, best, best_iou = reference[i], None, min_iou
        for j, c in enumerate(candidate):
            if j in used or c["model"] != r["model"] or c["class_id"] != r["class_id"]:
                continue
            overlap = overlap_of(r["box"], c["box"])
            if overlap > best_iou or (best is None and overlap >= best_iou):
                best, best_iou = j, overlap
        if best is not None:
            used.add(best)
            pairs.append((i, best, best_iou))
    return pairs


def check_detections(
    reference: Sequence[dict],
    candidate: Sequence[dict],
    threshold: float = SERVING_THRESHOLD,
    rule: Rule = RULES["exact"],
) -> DetectionCheck:
    """Compare two answers (response "detections" lists) at ``threshold`` under ``rule``."""
    box_tol = rule.box_tol if rule.box_tol is not None else float("inf")
    ref = [d for d in reference if d["score"] >= threshold - rule.score_tol]
    cand = [d for d in candidate if d["score"] >= threshold - rule.score_tol]
    border = lambda d: abs(d["score"] - threshold) <= rule.score_tol  # noqa: E731
    pairs = match(ref, cand)
    matched_ref, matched_cand = {i for i, _, _ in pairs}, {j for _, j, _ in pairs}
    swaps = 0
    box_diff = score_diff = 0.0
    for i, j, overlap in pairs:
        r, c = ref[i], cand[j]
        ds = abs(r["score"] - c["score"])
        db = max(abs(a - b) for a, b in zip(r["box"], c["box"]))
        score_diff = max(score_diff, ds)
        if db > box_tol and overlap >= 0.8 and ds <= TIE:
            swaps += 1
        else:
            box_diff = max(box_diff, db)
    return DetectionCheck(
        reference=len(ref),
        candidate=len(cand),
        matched=len(pairs),
        missing=sum(1 for i, r in enumerate(ref) if i not in matched_ref and not border(r)),
        extra=sum(1 for j, c in enumerate(cand) if j not in matched_cand and not border(c)),
        max_box_diff=box_diff,
        max_score_diff=score_diff,
        swaps=swaps,
    )


@dataclass
class Agreement:
    """How close two answers are at every score (the ablation's and the tests' statistics)."""

    reference: int  # detections in the reference
    candidate: int  # detections in the candidate
    matched: int  # pairs with the same model + label and IoU >= min_iou
    max_box_diff: float  # px, over matched pairs
    max_score_diff: float
    mean_iou: float  # over matched pairs
    box_mse: float
    score_mse: float

    @property
    def label_agreement(self) -> float:
        return self.matched / max(self.reference, self.candidate, 1)

    def exact(self, box_tol: float = 1e-3, score_tol: float = 1e-4) -> bool:
        """Identical up to float noise: for the same path served two ways (in-process, HTTP, batched)."""
        return (
            self.reference == self.candidate == self.matched
            and self.max_box_diff <= box_tol
            and self.max_score_diff <= score_tol
        )


def agreement(reference: Sequence[dict], candidate: Sequence[dict], min_iou: float = 0.5) -> Agreement:
    pairs = match(reference, candidate, min_iou)
    box_diffs, score_diffs, box_sq = [], [], []
    for i, j, _ in pairs:
        diffs = [abs(x - y) for x, y in zip(reference[i]["box"], candidate[j]["box"])]
        box_diffs.append(max(diffs))
        box_sq.extend(d * d for d in diffs)
        score_diffs.append(abs(reference[i]["score"] - candidate[j]["score"]))
    n = len(pairs)
    return Agreement(
        reference=len(reference),
        candidate=len(candidate),
        matched=n,
        max_box_diff=max(box_diffs, default=0.0),
        max_score_diff=max(score_diffs, default=0.0),
        mean_iou=sum(o for _, _, o in pairs) / n if n else (1.0 if not reference and not candidate else 0.0),
        box_mse=sum(box_sq) / len(box_sq) if box_sq else 0.0,
        score_mse=sum(d * d for d in score_diffs) / n if n else 0.0,
    )


@dataclass
class Verdict:
    """Whether a candidate path gives the baseline's answer under its tier's rule, and why not."""

    same: bool
    reasons: list[str]
    checks: list[DetectionCheck]  # one per answer (image, or image and model)


def judge(
    reference: Sequence[Sequence[dict]],
    candidate: Sequence[Sequence[dict]],
    reference_maps: dict[str, dict[str, float]],
    candidate_maps: dict[str, dict[str, float]],
    tier: str,
    threshold: float = SERVING_THRESHOLD,
) -> Verdict:
    """The one verdict (auto at load, the ablation, the tests): ``reference``/``candidate`` are answers
    (response detection lists) of the same images; ``*_maps`` per model its mAP figures by name (e.g.
    ``{"mAP@0.5": 0.61}``). exact: every answer's detections at the serving threshold one to one and
    every mAP within 0.1 points; reduced: no mAP more than 0.5 points below the baseline's. ``threshold``: the
    score the service answers at (``Settings.threshold``), where detections are compared."""
    rule = RULES[tier]
    checks = [check_detections(r, c, threshold, rule) for r, c in zip(reference, candidate, strict=True)]
    reasons = []
    bad = [c for c in checks if not c.ok(rule)]
    if bad:
        reasons.append(f"detections differ in {len(bad)} of {len(checks)} answers: {bad[0]}")
    for model, figures in reference_maps.items():
        for metric, base in figures.items():
            value = candidate_maps[model][metric]
            if not map_ok(base, value, rule):
                reasons.append(f"{model} {metric} {value:.4f} vs baseline {base:.4f}")
    return Verdict(not reasons, reasons, checks)


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


IOUS = np.linspace(0.5, 0.95, 10)
RECALLS = np.linspace(0.0, 1.0, 101)


def _iou(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """[D, G] IoU of xywh boxes (COCO's maskUtils.iou for non-crowd boxes)."""
    dx2, dy2 = d[:, 0] + d[:, 2], d[:, 1] + d[:, 3]
    gx2, gy2 = g[:, 0] + g[:, 2], g[:, 1] + g[:, 3]
    iw = np.clip(np.minimum(dx2[:, None], gx2[None]) - np.maximum(d[:, 0, None], g[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(dy2[:, None], gy2[None]) - np.maximum(d[:, 1, None], g[None, :, 1]), 0, None)
    inter = iw * ih
    union = (d[:, 2] * d[:, 3])[:, None] + (g[:, 2] * g[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def coco_map(coco_gt: dict, results: list[dict], max_dets: int = 100) -> tuple[float, float]:
    """(mAP@0.5, mAP@[.5:.95]) of ``results`` (COCO result dicts) against ground truth ``coco_gt``, both in 0..1.

    pycocotools' COCOeval for bounding boxes (area "all", no crowd annotations), without it (the serving
    path, where ``auto`` scores its check set, imports no pycocotools): per image and category the
    detections sorted by score (stable) and cut to the top ``max_dets``, each matched greedily to the
    unmatched ground-truth box of highest IoU >= t; precision made monotone and sampled at 101 recall
    points; AP averaged over the categories with ground truth (and over IoU 0.50:0.05:0.95 for mAP).
    tests/test_quality.py checks it against pycocotools."""
    return ap_table(coco_gt, results, max_dets).means


@dataclass(frozen=True)
class APTable:
    """AP of each category with ground truth (columns, ``categories``' order) at each IoU of ``IOUS`` (rows)."""

    categories: list[int]
    ap: np.ndarray

    @property
    def means(self) -> tuple[float, float]:
        """(mAP@0.5, mAP@[.5:.95]): the categories' mean (0 without categories)."""
        if not self.categories:
            return 0.0, 0.0
        return float(self.ap[0].mean()), float(self.ap.mean())

    def per_category(self) -> dict[int, tuple[float, float]]:
        """Category id -> (AP@0.5, AP@[.5:.95])."""
        return {c: (float(self.ap[0, k]), float(self.ap[:, k].mean())) for k, c in enumerate(self.categories)}


def ap_table(coco_gt: dict, results: list[dict], max_dets: int = 100) -> APTable:
    """AP per category and IoU threshold, computed once (``coco_map`` averages it; see there for how)."""
    images = [img["id"] for img in coco_gt["images"]]
    gts, dts = defaultdict(list), defaultdict(list)
    for a in coco_gt["annotations"]:
        gts[a["image_id"], a["category_id"]].append(a["bbox"])
    for r in results:
        dts[r["image_id"], r["category_id"]].append((r["score"], r["bbox"]))
    categories = sorted({c for _, c in gts})
    ap = np.zeros((len(IOUS), len(categories)))
    if not results:
        return APTable(categories, ap)
    for ci, cat in enumerate(categories):
        scores, matched, n_gt = [], [], 0
        for img in images:
            g = np.array(gts.get((img, cat), []), dtype=np.float64).reshape(-1, 4)
            n_gt += len(g)
            found = dts.get((img, cat), [])
            order = sorted(range(len(found)), key=lambda i: -found[i][0])[:max_dets]  # stable, as COCOeval
            if not order:
                continue
            d = np.array([found[i][1] for i in order], dtype=np.float64).reshape(-1, 4)
            ious = _iou(d, g) if len(g) else np.zeros((len(d), 0))
            hit = np.zeros((len(IOUS), len(d)), dtype=bool)
            for ti, t in enumerate(IOUS):
                taken = np.zeros(len(g), dtype=bool)
                for di in range(len(d)):
                    best, best_iou = -1, min(t, 1 - 1e-10)
                    for gi in range(len(g)):
                        if taken[gi] or ious[di, gi] < best_iou:
                            continue
                        best, best_iou = gi, ious[di, gi]
                    if best >= 0:
                        taken[best] = True
                        hit[ti, di] = True
            scores.extend(found[i][0] for i in order)
            matched.append(hit)
        if n_gt == 0:
            continue
        if not scores:
            continue  # AP 0
        order = np.argsort(-np.array(scores), kind="mergesort")
        hits = np.concatenate(matched, axis=1)[:, order]
        tp, fp = np.cumsum(hits, axis=1), np.cumsum(~hits, axis=1)
        for ti in range(len(IOUS)):
            recall = tp[ti] / n_gt
            precision = tp[ti] / np.maximum(tp[ti] + fp[ti], np.spacing(1))
            precision = np.maximum.accumulate(precision[::-1])[::-1]
            idx = np.searchsorted(recall, RECALLS, side="left")
            sampled = np.array([precision[i] if i < len(precision) else 0.0 for i in idx])
            ap[ti, ci] = sampled.mean()
    return APTable(categories, ap)
