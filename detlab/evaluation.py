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

from multidet.config import Settings
from multidet.pipeline import Detector, RequestOptions
from multidet.quality import ap_table, iou


@dataclass
class EvalResult:
    model: str
    optimization: str
    map50: float
    map: float
    images: int
    detections: dict[int, list[dict]] = field(default_factory=dict, repr=False)  # image id -> detections
    per_class: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)  # name -> (AP@.5, AP)
    # at the serving threshold (mAP ranks detections at any score; a served answer keeps those above it):
    threshold: float = 0.0
    recall: float = 0.0  # labelled objects found (same class, IoU >= 0.5) by a detection scoring >= threshold
    false_per_image: float = 0.0  # detections scoring >= threshold that find no labelled object, per image

    def summary(self) -> dict:
        return {
            "model": self.model,
            "optimization": self.optimization,
            "map50": round(self.map50, 4),
            "map": round(self.map, 4),
            "images": self.images,
            f"recall@{self.threshold:g}": round(self.recall, 4),
            f"false_per_image@{self.threshold:g}": round(self.false_per_image, 3),
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
    threshold: float | None = None,
) -> EvalResult:
    """Run ``model`` of ``detector`` over the dataset at ``data_dir`` and score it: mAP over every
    detection, recall and false positives over those scoring >= ``threshold`` (the served answer; default:
    the service's default threshold)."""
    if threshold is None:
        threshold = Settings().threshold
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
    table = ap_table(coco_gt, results)  # once: mAP and AP per class from the same matching
    map50, map_ = table.means
    names = {c["id"]: c.get("name", str(c["id"])) for c in coco_gt.get("categories", [])}
    per_class = {names.get(c, str(c)): ap for c, ap in table.per_category().items()}
    by_image: dict[int, list[dict]] = {}
    for a in coco_gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    found = false = 0
    for img in images:
        match = served_matches(per_image[img["id"]], by_image.get(img["id"], []), threshold)
        found, false = found + match[0], false + match[1]
    objects = sum(map(len, by_image.values()))
    return EvalResult(
        model=model,
        optimization=detector.description,
        map50=map50,
        map=map_,
        images=len(images),
        detections=per_image,
        per_class=per_class,
        threshold=threshold,
        recall=found / objects if objects else 0.0,
        false_per_image=false / len(images) if images else 0.0,
    )


def served_matches(detections: list[dict], labelled: list[dict], threshold: float, min_iou: float = 0.5):
    """(objects found, false detections) of one image's answer at ``threshold`` against its COCO annotations,
    by ``greedy_match`` (class ids as kinds)."""
    objects = {}
    for i, a in enumerate(labelled):
        x, y, w, h = a["bbox"]
        objects[i] = (a["category_id"], [x, y, x + w, y + h])
    found, false = greedy_match(detections, objects, lambda d: d["class_id"], threshold, min_iou)
    return len(found), len(false)


def greedy_match(detections, objects: dict, kind_of, threshold: float, min_iou: float = 0.5):
    """The detections scoring >= ``threshold``, highest first, each finding the free object (``objects``:
    index -> (kind, box)) of its kind (``kind_of(detection)``) it overlaps most, at IoU >= ``min_iou``; a
    detection that finds none is false. Returns ([(object index, detection)], [false detections])."""
    free = dict(objects)
    found, false = [], []
    for d in sorted((d for d in detections if d["score"] >= threshold), key=lambda d: -d["score"]):
        kind = kind_of(d)
        overlap, best = max(((iou(d["box"], box), i) for i, (k, box) in free.items() if k == kind), default=(0.0, None))
        if best is None or overlap < min_iou:
            false.append(d)
        else:
            del free[best]
            found.append((best, d))
    return found, false


@dataclass
class ImageCheck:
    """One image's answer against its labels, by object kind across the models of a set: each labelled
    object must be found (same kind, IoU >= 0.5) by every model whose classes include its kind, and every
    detection must be such a find (a second detection of one object by one model is a false positive)."""

    objects: int
    found: list[tuple[str, int, dict]]  # (model, object index, detection)
    missed: list[tuple[str, int]]  # (model, object index)
    false: list[dict]  # detections that find no object

    @property
    def complete(self) -> bool:
        return not self.missed and not self.false


def kinds_of(detector: Detector) -> dict[str, dict[int, str]]:
    """Each model's class id -> object kind name, from the class ids its training data drew (its metadata)."""
    from .synthetic import DataSpec, kind_table

    return {m.name: {c: k.name for c, k in kind_table(DataSpec.of(m), cap=True).items()} for m in detector.models}


def check_image(
    detections: list[dict],
    objects: list[dict],
    kinds: dict[str, dict[int, str]],
    threshold: float,
    min_iou: float = 0.5,
) -> ImageCheck:
    """``objects``: ``{"kind": "green ring", "box": [x1, y1, x2, y2]}``; ``detections``: a response's, any
    threshold (those below ``threshold`` are ignored); ``kinds``: ``kinds_of(detector)``."""
    found, missed, false = [], [], []
    for model, table in kinds.items():
        own = {i: (o["kind"], o["box"]) for i, o in enumerate(objects) if o["kind"] in table.values()}
        mine = [d for d in detections if d["model"] == model]
        hits, wrong = greedy_match(mine, own, lambda d, table=table: table.get(d["class_id"]), threshold, min_iou)
        found += [(model, i, d) for i, d in hits]
        false += wrong
        missed += [(model, i) for i in sorted(set(own) - {i for i, _ in hits})]
    return ImageCheck(len(objects), found, missed, false)


def labelled_objects(coco: dict, image_id: int) -> list[dict]:
    """A COCO-format split's (``make dataset``'s) objects of one image as ``check_image`` takes them: the
    category's ``supercategory`` names its kind."""
    kind = {c["id"]: c.get("supercategory", c["name"]) for c in coco["categories"]}
    objects = []
    for a in (a for a in coco["annotations"] if a["image_id"] == image_id):
        x, y, w, h = a["bbox"]
        objects.append({"kind": kind[a["category_id"]], "box": [x, y, x + w, y + h]})
    return objects
