"""Compare two responses' detections: the proof that an optimised path gives the baseline's answer.

Detections are matched one to one: same model and label, greedily by IoU in score order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Agreement:
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
        return (
            self.reference == self.candidate == self.matched
            and self.max_box_diff <= box_tol
            and self.max_score_diff <= score_tol
        )


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compare(reference: list[dict], candidate: list[dict], min_iou: float = 0.5) -> Agreement:
    used: set[int] = set()
    box_diffs, score_diffs, ious, box_sq, score_sq = [], [], [], [], []
    for ref in sorted(reference, key=lambda d: -d["score"]):
        best, best_iou = None, min_iou
        for j, cand in enumerate(candidate):
            if j in used or cand["model"] != ref["model"] or cand["class_id"] != ref["class_id"]:
                continue
            overlap = iou(ref["box"], cand["box"])
            if overlap > best_iou or (best is None and overlap >= best_iou):
                best, best_iou = j, overlap
        if best is None:
            continue
        used.add(best)
        cand = candidate[best]
        diffs = [abs(x - y) for x, y in zip(ref["box"], cand["box"])]
        box_diffs.append(max(diffs))
        box_sq.extend(d * d for d in diffs)
        score_diffs.append(abs(ref["score"] - cand["score"]))
        score_sq.append(score_diffs[-1] ** 2)
        ious.append(best_iou)
    n = len(ious)
    return Agreement(
        reference=len(reference),
        candidate=len(candidate),
        matched=n,
        max_box_diff=max(box_diffs, default=0.0),
        max_score_diff=max(score_diffs, default=0.0),
        mean_iou=sum(ious) / n if n else (1.0 if not reference and not candidate else 0.0),
        box_mse=sum(box_sq) / len(box_sq) if box_sq else 0.0,
        score_mse=sum(score_sq) / n if n else 0.0,
    )
