"""COCO mAP of the whole data path (decode -> letterbox -> optimization -> NMS -> original-pixel boxes).

``evaluate`` feeds a COCO-format dataset's JPEG bytes through ``Detector.predict`` exactly as a
request would arrive (threshold 0, one model), and scores the returned detections with
pycocotools' COCOeval: ``map50`` is AP at IoU 0.5, ``map`` AP averaged over IoU 0.5:0.95
(both in 0..1). ``detections`` keeps the per-image answer at any threshold for path comparisons.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .pipeline import Detector, RequestOptions
from .quality import coco_map


@dataclass
class EvalResult:
    model: str
    optimization: str
    map50: float
    map: float
    images: int
    detections: dict[int, list[dict]] = field(default_factory=dict, repr=False)  # image id -> detections

    def summary(self) -> dict:
        return {
            "model": self.model,
            "optimization": self.optimization,
            "map50": round(self.map50, 4),
            "map": round(self.map, 4),
            "images": self.images,
        }


def read_dataset(data_dir: Path) -> dict:
    path = Path(data_dir) / "annotations.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: a dataset folder holds images/ and annotations.json "
            "(`make dataset` writes the default ones)"
        )
    return json.loads(path.read_text())


def evaluate(
    detector: Detector,
    data_dir: Path,
    model: str,
    batch_size: int = 4,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Run ``model`` of ``detector`` over the dataset at ``data_dir`` and score it."""
    data_dir = Path(data_dir)
    coco_gt = read_dataset(data_dir)
    images = coco_gt["images"][:limit] if limit else coco_gt["images"]
    if limit:
        ids = {img["id"] for img in images}
        coco_gt = {
            **coco_gt,
            "images": images,
            "annotations": [a for a in coco_gt["annotations"] if a["image_id"] in ids],
        }
    options = RequestOptions(threshold=0.0, models=(model,))
    results, per_image = [], {}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        bodies = [(data_dir / "images" / img["file_name"]).read_bytes() for img in chunk]
        for img, out in zip(chunk, detector.predict(bodies, [options] * len(chunk))):
            if isinstance(out, Exception):
                raise RuntimeError(f"{img['file_name']}: {out}")
            per_image[img["id"]] = out["detections"]
            for d in out["detections"]:
                x1, y1, x2, y2 = d["box"]
                results.append(
                    {
                        "image_id": img["id"],
                        "category_id": d["class_id"],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": d["score"],
                    }
                )
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    map50, map_ = coco_map(coco_gt, results)
    return EvalResult(
        model=model,
        optimization=detector.description,
        map50=map50,
        map=map_,
        images=len(images),
        detections=per_image,
    )
