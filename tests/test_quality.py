"""The one rule for "the same answer" (multidet.quality), on hand-made answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multidet.quality import RULES, ap_table, check_detections, coco_map, map_ok, raw_difference

EXACT, REDUCED = RULES["exact"], RULES["reduced"]


def det(box, score, class_id=1, model="m"):
    return {"model": model, "class_id": class_id, "label": str(class_id), "score": score, "box": list(box)}


BASE = [
    det((10, 10, 50, 60), 0.95),
    det((100, 100, 140, 180), 0.80, 2),
    det((200, 20, 260, 70), 0.62, 3),
    det((300, 300, 310, 310), 0.20),
]  # below the threshold: not compared


def ok(candidate, reference=BASE, rule=EXACT):
    return check_detections(reference, candidate, 0.5, rule).ok(rule)


def test_identical_and_float_noise_are_the_same_answer():
    assert ok(BASE)
    noisy = [det([v + 0.3 for v in d["box"]], d["score"] + 5e-4, d["class_id"]) for d in BASE]
    assert ok(noisy)


def test_a_box_of_almost_no_height_is_matched_by_its_coordinates():
    """Seen on a val image: a box of almost no height, whose IoU with itself float noise decides."""
    from multidet.quality import iou

    flat = BASE[:3] + [det((0, 541.0, 619, 541.004), 0.998, 4)]
    shifted = BASE[:3] + [det((0, 541.003, 619, 541.007), 0.998, 4)]
    assert iou(flat[3]["box"], shifted[3]["box"]) < 0.5
    assert ok(shifted, flat)
    assert not ok(BASE[:3] + [det((0, 542.0, 619, 542.04), 0.998, 4)], flat)  # a whole pixel away: another box


def test_moved_box_missing_extra_relabelled_or_rescored_are_not():
    two_moved = [det((10.8, 10, 50, 60), 0.95), det((100.8, 100, 140, 180), 0.80, 2)] + BASE[2:]
    assert not ok(two_moved)  # 0.8 px > 0.5 px, twice
    assert not ok([det((10.8, 10, 50, 60), 0.9495)] + BASE[1:])  # moved and rescored: no tie
    assert not ok(BASE[:1] + BASE[2:])  # one missing
    assert not ok(BASE + [det((400, 400, 450, 450), 0.7)])  # one extra
    assert not ok([det((10, 10, 50, 60), 0.95, 5)] + BASE[1:])  # another label
    assert not ok([det((10, 10, 50, 60), 0.93)] + BASE[1:])  # score off by 2e-2
    assert not ok([det((10, 10, 50, 60), 0.95, model="other")] + BASE[1:])  # another model


def test_near_ties_are_not_errors():
    border = BASE + [det((400, 400, 450, 450), 0.5004)]
    assert ok(BASE, border) and ok(border, BASE)  # a score at the threshold may fall either side
    swapped = [det((11.5, 10, 51.5, 60), 0.95)] + BASE[1:]  # NMS kept the tied neighbour's box
    assert ok(swapped)  # one such pair per answer (or 1 %) is a tie, not an error: indistinguishable
    many = [det((x, 10, x + 40, 60), 0.9) for x in range(0, 400, 50)]
    all_swapped = [det((x + 1.5, 10, x + 41.5, 60), 0.9) for x in range(0, 400, 50)]
    assert not ok(all_swapped, many)  # but a systematic shift is an error


def test_reduced_tier_is_judged_by_map_only():
    assert ok([det((12, 12, 52, 62), 0.9)] + BASE[1:], rule=REDUCED)
    assert map_ok(0.800, 0.7951, REDUCED) and not map_ok(0.800, 0.794, REDUCED)
    assert map_ok(0.800, 0.8009, EXACT) and not map_ok(0.800, 0.7985, EXACT) and not map_ok(0.8, 0.802, EXACT)


def test_coco_map_scores_perfect_and_wrong_answers():
    gt = {
        "images": [{"id": 1, "width": 400, "height": 300}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 50], "area": 2000, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 100, 40, 80], "area": 3200, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    perfect = [
        {"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]
    ]
    assert coco_map(gt, perfect) == pytest.approx((1.0, 1.0))
    half = [{**perfect[0]}, {**perfect[1], "category_id": 1, "score": 0.5}]  # b called a: no b found
    assert coco_map(gt, half)[0] == pytest.approx(0.5)
    assert coco_map(gt, []) == (0.0, 0.0)
    # per category: a found (its extra detection ranks below the true one), b not; coco_map is their mean
    assert ap_table(gt, half).per_category() == {1: pytest.approx((1.0, 1.0)), 2: (0.0, 0.0)}
    assert ap_table(gt, []).per_category() == {1: (0.0, 0.0), 2: (0.0, 0.0)}


def test_raw_difference_is_relative_to_the_outputs_range():
    a = [torch.tensor([[1.0, -4.0]]), torch.tensor([0.5])]
    assert raw_difference(a, [t.clone() for t in a]) == 0.0
    assert abs(raw_difference(a, [torch.tensor([[1.0, -4.004]]), torch.tensor([0.5])]) - 1e-3) < 1e-6


def _pycocotools_map(coco_gt: dict, results: list[dict]) -> tuple[float, float]:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_gt
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ev.params.imgIds = [img["id"] for img in coco_gt["images"]]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[1]), 0.0), max(float(ev.stats[0]), 0.0)


def test_own_map_is_pycocotools_map():
    """quality.coco_map (no pycocotools: the serving path scores auto's check set with it) gives
    COCOeval's mAP@0.5 and mAP@[.5:.95] on random answers: misses, false positives, wrong labels, score ties."""
    import random

    rng = random.Random(0)
    for _ in range(25):
        images = [{"id": i + 1, "width": 500, "height": 400} for i in range(rng.randint(1, 5))]
        cats = list(range(1, rng.randint(2, 6)))
        anns, res = [], []
        for img in images:
            for _ in range(rng.randint(0, 6)):
                x, y, w, h = rng.uniform(0, 300), rng.uniform(0, 200), rng.uniform(5, 150), rng.uniform(5, 150)
                c = rng.choice(cats)
                anns.append(
                    {"id": len(anns) + 1, "image_id": img["id"], "category_id": c, "bbox": [x, y, w, h],
                     "area": w * h, "iscrowd": 0}
                )  # fmt: skip
                for _ in range(rng.randint(0, 3)):
                    jitter = [x + rng.gauss(0, 10), y + rng.gauss(0, 10), max(1, w + rng.gauss(0, 10)), max(1, h)]
                    label = c if rng.random() < 0.8 else rng.choice(cats)
                    res.append(
                        {"image_id": img["id"], "category_id": label, "bbox": jitter, "score": round(rng.random(), 2)}
                    )
            for _ in range(rng.randint(0, 4)):
                box = [rng.uniform(0, 300), rng.uniform(0, 200), 50, 50]
                res.append({"image_id": img["id"], "category_id": rng.choice(cats), "bbox": box, "score": rng.random()})
        gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in cats]}
        assert coco_map(gt, res) == pytest.approx(_pycocotools_map(gt, res), abs=1e-9)


def test_the_serving_path_imports_no_dataset_generator():
    """Loading the data path (and auto) pulls in no dataset generator or trainer; the project's mAP needs no
    pycocotools (effdet's own package import still loads it: effdet.data imports its COCO parser)."""
    code = (
        "import sys, multidet.pipeline, multidet.optimizations, multidet.envelopes, multidet.quality;"
        "bad = [m for m in sys.modules if m.split('.')[:2] in (['multidet', 'synthetic'], ['multidet', 'training'])];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import multidet.quality

    source = Path(multidet.quality.__file__).read_text()
    assert "import pycocotools" not in source and "from pycocotools" not in source


def test_an_image_against_its_labels_by_kind_across_models():
    """detlab.evaluation.check_image: each object found by every model that has its kind, nothing else."""
    from detlab.evaluation import check_image

    kinds = {"a": {1: "red circle", 2: "green square"}, "b": {7: "red circle"}}  # b has no green square
    objects = [{"kind": "red circle", "box": [10, 10, 50, 50]}, {"kind": "green square", "box": [100, 100, 160, 150]}]
    right = [
        det((11, 10, 50, 52), 0.9, 1, "a"),
        det((100, 101, 158, 150), 0.7, 2, "a"),
        det((10, 11, 49, 50), 0.9, 7, "b"),
    ]
    check = check_image(right, objects, kinds, 0.5)
    assert check.complete and len(check.found) == 3 and check.objects == 2
    assert check_image(right + [det((0, 0, 5, 5), 0.4, 1, "a")], objects, kinds, 0.5).complete  # below: not seen
    # each way of being wrong is named: missed (per model), wrong kind, a duplicate, a box off the object
    missed = check_image(right[:2], objects, kinds, 0.5)
    assert missed.missed == [("b", 0)] and not missed.false
    relabelled = check_image([*right[:2], det((10, 11, 49, 50), 0.9, 8, "b")], objects, kinds, 0.5)
    assert relabelled.missed == [("b", 0)] and [d["class_id"] for d in relabelled.false] == [8]
    duplicate = check_image([*right, det((12, 12, 50, 50), 0.6, 1, "a")], objects, kinds, 0.5)
    assert not duplicate.missed and [d["score"] for d in duplicate.false] == [0.6]
    off = check_image([det((30, 30, 70, 70), 0.9, 1, "a"), *right[1:]], objects, kinds, 0.5)
    assert off.missed == [("a", 0)] and len(off.false) == 1


def test_the_verdict_compares_answers_at_the_served_threshold():
    """auto judges where the service answers (Settings.threshold): a detection the candidate lost at 0.30 is
    not in an answer served at 0.5, and is in one served at 0.25."""
    from multidet.config import Settings
    from multidet.quality import SERVING_THRESHOLD, judge

    lost = [d for d in BASE if d["score"] != 0.20] + [det((300, 300, 310, 310), 0.30)]
    maps = {"m": {"mAP@0.5": 0.5}}
    assert SERVING_THRESHOLD == Settings.threshold  # one source
    assert judge([lost], [BASE], maps, maps, "exact").same  # at the default, 0.5
    assert judge([lost], [BASE], maps, maps, "exact", threshold=0.5).same
    verdict = judge([lost], [BASE], maps, maps, "exact", threshold=0.25)
    assert not verdict.same and "detections differ in 1 of 1" in verdict.reasons[0]
