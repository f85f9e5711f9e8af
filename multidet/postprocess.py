"""Step 4: raw network outputs -> detections in original-image pixels -> one merged response.

``select_detections`` is effdet's own DetBenchPredict post-processing (top-k candidates, box
decoding against the anchors, clipping to the image area, batched NMS, top ``max_det``), called
with the letterbox's image area so boxes are clipped before NMS exactly as effdet's evaluation does.
``to_original`` maps network pixels back to the original image; ``detections_for`` applies the
score threshold and names the classes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from effdet.bench import _batch_detection, _post_process

from .preprocess import Letterbox


def letterbox_tensors(letterboxes: Sequence[Letterbox], device) -> tuple[torch.Tensor, torch.Tensor]:
    """effdet's ``img_info`` for a batch: img_scale [B] and img_size (w, h) [B, 2], float32."""
    scale = torch.tensor([lb.scale for lb in letterboxes], dtype=torch.float32, device=device)
    size = torch.tensor([[lb.width, lb.height] for lb in letterboxes], dtype=torch.float32, device=device)
    return scale, size


def select_detections(class_out: Sequence[torch.Tensor], box_out: Sequence[torch.Tensor],
                      anchor_boxes: torch.Tensor, num_classes: int, img_scale: torch.Tensor,
                      img_size: torch.Tensor, max_det: int, max_detection_points: int = 5000,
                      ) -> torch.Tensor:
    """[B, max_det, 6] rows (x1, y1, x2, y2, score, class_id) in NETWORK pixels, clipped to the
    image area; rows past the last detection are zero (class_id 0)."""
    cls_top, box_top, indices, classes = _post_process(
        list(class_out), list(box_out), num_levels=len(class_out), num_classes=num_classes,
        max_detection_points=max_detection_points)
    # img_scale=1 with img_size = size / scale: effdet clips to the image area in network pixels and
    # leaves the scale-back to ``to_original`` (the same float32 ops as passing img_info directly).
    content = img_size / img_scale[:, None]
    ones = torch.ones_like(img_scale)
    return _batch_detection(box_top.shape[0], cls_top, box_top, anchor_boxes, indices, classes,
                            ones, content, max_det_per_image=max_det, soft_nms=False)


def to_original(boxes: torch.Tensor, letterbox: Letterbox) -> torch.Tensor:
    """Network-pixel xyxy boxes -> original-image pixels, clipped to [0, W] x [0, H]."""
    scale = torch.tensor(letterbox.scale, dtype=torch.float32, device=boxes.device)
    out = boxes * scale
    out[:, 0::2] = out[:, 0::2].clamp(0, letterbox.width)
    out[:, 1::2] = out[:, 1::2].clamp(0, letterbox.height)
    return out


def detections_for(rows: torch.Tensor, letterbox: Letterbox, model_name: str,
                   class_names: Sequence[str], threshold: float) -> list[dict]:
    """One model's rows for one image -> detection dicts (score >= threshold, non-empty boxes)."""
    rows = rows.detach().float().cpu()
    keep = (rows[:, 5] >= 1) & (rows[:, 4] >= threshold)
    rows = rows[keep]
    boxes = to_original(rows[:, :4], letterbox)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = []
    for box, score, cls in zip(boxes[nonempty].tolist(), rows[nonempty, 4].tolist(),
                               rows[nonempty, 5].tolist()):
        class_id = int(cls)
        out.append({"model": model_name, "class_id": class_id, "label": class_names[class_id - 1],
                    "score": float(score), "box": box})
    return out


def merge(per_model: dict[str, list[dict]], num_classes: dict[str, int]) -> tuple[list[dict], list[dict]]:
    """All models' detections in one list, score-descending, plus the per-model summary."""
    detections = [d for dets in per_model.values() for d in dets]
    detections.sort(key=lambda d: d["score"], reverse=True)
    models = [{"name": name, "num_classes": num_classes[name], "count": len(dets)}
              for name, dets in per_model.items()]
    return detections, models
