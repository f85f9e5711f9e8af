"""Step 4: raw network outputs -> detections in original-image pixels -> one merged response.

``select_detections`` is effdet's own DetBenchPredict post-processing (top-k candidates, box
decoding against the anchors, clipping to the image area, batched NMS, top ``max_det``), called
with the letterbox's image area so boxes are clipped before NMS exactly as effdet's evaluation does.
``to_original`` maps network pixels back to the original image; ``detections_for`` applies the
score threshold and names the classes.

Threshold pre-filter: with a score threshold t > 0, candidates scoring below t are dropped before
the top-k instead of after NMS. That cannot change the answer: a candidate below t is never
returned, and in NMS a lower-scored box never suppresses a higher-scored one, so every box >= t
meets exactly the same competitors. When more than ``max_detection_points`` candidates pass, the
top-k runs as before. With t = 0 the path is effdet's, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from effdet.anchors import generate_detections
from effdet.bench import _batch_detection, _post_process

from .preprocess import Letterbox


def select_detections(
    class_out: Sequence[torch.Tensor],
    box_out: Sequence[torch.Tensor],
    anchor_boxes: torch.Tensor,
    num_classes: int,
    img_scale: torch.Tensor,
    img_size: torch.Tensor,
    max_det: int,
    max_detection_points: int = 5000,
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, max_det, 6] rows (x1, y1, x2, y2, score, class_id) in NETWORK pixels, clipped to the
    image area; rows past the last detection are zero (class_id 0). ``thresholds`` [B]: each
    image's score threshold, for the pre-filter (None or 0: effdet's path)."""
    if thresholds is not None and bool((thresholds > 0).any()):
        return _select_prefiltered(
            class_out,
            box_out,
            anchor_boxes,
            num_classes,
            img_scale,
            img_size,
            max_det,
            max_detection_points,
            thresholds,
        )
    cls_top, box_top, indices, classes = _post_process(
        list(class_out),
        list(box_out),
        num_levels=len(class_out),
        num_classes=num_classes,
        max_detection_points=max_detection_points,
    )
    # img_scale=1 with img_size = size / scale: effdet clips to the image area in network pixels and
    # leaves the scale-back to ``to_original`` (the same float32 ops as passing img_info directly).
    content = img_size / img_scale[:, None]
    ones = torch.ones_like(img_scale)
    return _batch_detection(
        box_top.shape[0],
        cls_top,
        box_top,
        anchor_boxes,
        indices,
        classes,
        ones,
        content,
        max_det_per_image=max_det,
        soft_nms=False,
    )


def _candidates(class_out: Sequence[torch.Tensor], i: int, cut: torch.Tensor) -> torch.Tensor:
    """Flat (anchor x class) indices, in effdet's flattened order, of image ``i``'s logits >= ``cut``,
    found level by level on the NCHW outputs without an [anchors, classes] copy of the whole class
    tensor (4.4 M floats for the 90-class head): first the pixels whose largest logit reaches the cut
    (one reduction over channels), then the channels of those pixels only. Channel ch = a * C + c,
    so the flat index over (h, w, a, c) is offset + (h * W + w) * A * C + ch."""
    found, offset = [], 0
    for level in class_out:
        channels, height, width = level.shape[1:]
        plane = level[i].reshape(channels, height * width)
        pixels = (plane.amax(0) >= cut).nonzero().squeeze(1)
        if pixels.numel():
            ch, p = (plane[:, pixels] >= cut).nonzero(as_tuple=True)
            found.append(offset + pixels[p] * channels + ch)
        offset += channels * height * width
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long, device=class_out[0].device)


def _select_prefiltered(
    class_out, box_out, anchor_boxes, num_classes, img_scale, img_size, max_det, max_detection_points, thresholds
) -> torch.Tensor:
    batch = class_out[0].shape[0]
    box_all = torch.cat([b.permute(0, 2, 3, 1).reshape(batch, -1, 4) for b in box_out], 1)
    content = img_size / img_scale[:, None]
    one = torch.ones((), dtype=img_scale.dtype, device=img_scale.device)
    dtype = class_out[0].dtype
    # a logit cut slightly below logit(t), so float rounding of sigmoid never loses a box >= t; compared
    # in the logits' own dtype, rounded down once more (a superset of candidates is harmless: those
    # below t are never returned and, in NMS, never suppress a higher-scored box)
    cuts = torch.logit(thresholds.clamp(max=1.0 - 1e-7).double()) - 1e-4
    cuts = torch.nextafter(cuts.to(dtype), torch.tensor(float("-inf"), dtype=dtype, device=cuts.device))
    cls_all = None  # the flattened class tensor, only where effdet's own top-k is needed
    out = []
    for i in range(batch):
        keep = _candidates(class_out, i, cuts[i]) if thresholds[i] > 0 else None
        if keep is None or keep.numel() > max_detection_points:
            if cls_all is None:
                cls_all = torch.cat([c.permute(0, 2, 3, 1).reshape(batch, -1) for c in class_out], 1)
            flat = cls_all[i]
            scores, top = torch.topk(flat, k=max_detection_points)  # effdet's own top-k
        elif keep.numel() == 0:
            out.append(torch.zeros((max_det, 6), dtype=dtype, device=class_out[0].device))
            continue
        else:
            keep = keep.sort().values  # effdet's flattened order, then a stable sort by score
            values = _gather(class_out, i, keep)
            order = torch.sort(values, descending=True, stable=True).indices
            top, scores = keep[order], values[order]
        indices, classes = top // num_classes, top % num_classes
        out.append(
            generate_detections(
                scores.unsqueeze(1),
                box_all[i][indices],
                anchor_boxes,
                indices,
                classes,
                one,
                content[i],
                max_det_per_image=max_det,
                soft_nms=False,
            )
        )
    return torch.stack(out)


def _gather(class_out: Sequence[torch.Tensor], i: int, flat: torch.Tensor) -> torch.Tensor:
    """The logits of image ``i`` at flat (h, w, a, c) indices (the inverse of ``_candidates``)."""
    values = torch.empty(flat.shape, dtype=class_out[0].dtype, device=class_out[0].device)
    offset = 0
    for level in class_out:
        channels, height, width = level.shape[1:]
        size = channels * height * width
        mine = (flat >= offset) & (flat < offset + size)
        local = flat[mine] - offset
        pixel, ch = local // channels, local % channels
        values[mine] = level[i][ch, pixel // width, pixel % width]
        offset += size
    return values


def to_original(boxes: torch.Tensor, letterbox: Letterbox) -> torch.Tensor:
    """Network-pixel xyxy boxes -> original-image pixels, clipped to [0, W] x [0, H]."""
    scale = torch.tensor(letterbox.scale, dtype=torch.float32, device=boxes.device)
    out = boxes * scale
    out[:, 0::2] = out[:, 0::2].clamp(0, letterbox.width)
    out[:, 1::2] = out[:, 1::2].clamp(0, letterbox.height)
    return out


def detections_for(
    rows: torch.Tensor, letterbox: Letterbox, model_name: str, class_names: Sequence[str], threshold: float
) -> list[dict]:
    """One model's rows for one image -> detection dicts (score >= threshold, non-empty boxes)."""
    rows = rows.detach().float().cpu()
    keep = (rows[:, 5] >= 1) & (rows[:, 4] >= threshold)
    rows = rows[keep]
    boxes = to_original(rows[:, :4], letterbox)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = []
    for box, score, cls in zip(boxes[nonempty].tolist(), rows[nonempty, 4].tolist(), rows[nonempty, 5].tolist()):
        class_id = int(cls)
        out.append(
            {
                "model": model_name,
                "class_id": class_id,
                "label": class_names[class_id - 1],
                "score": float(score),
                "box": box,
            }
        )
    return out


def merge(per_model: dict[str, list[dict]], num_classes: dict[str, int]) -> tuple[list[dict], list[dict]]:
    """All models' detections in one list, score-descending, plus the per-model summary."""
    detections = [d for dets in per_model.values() for d in dets]
    detections.sort(key=lambda d: d["score"], reverse=True)
    models = [{"name": name, "num_classes": num_classes[name], "count": len(dets)} for name, dets in per_model.items()]
    return detections, models
