"""The labelled data generator: deterministic, COCO-valid, varied (detlab.synthetic, make_dataset.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from detlab.synthetic import KINDS, DataSpec, check_set, class_ids, kind_table
from helpers import NAMES, ROOT, SHIPPED, data_spec
from multidet.modelset import read_model_set

SET = read_model_set(SHIPPED)
spec = data_spec
SUBSET = spec(NAMES[0]).class_ids  # the ids the first model's data draws (training.yaml)

SCRIPT = [sys.executable, str(ROOT / "scripts" / "make_dataset.py")]


def digest(folder) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def make(tmp_path, name, model=NAMES[1], split="val", count=6, seed=0, ids=()):
    out = tmp_path / name
    run = subprocess.run(
        SCRIPT
        + ["--model", model, "--split", split, "--count", str(count), "--seed", str(seed), "--out", str(out)]
        + (["--class-ids", ",".join(map(str, ids))] if ids else []),
        capture_output=True,
        text=True,
        check=True,
    )
    return out, run


def test_same_seed_gives_byte_identical_files(tmp_path):
    a, run = make(tmp_path, "a")
    b, _ = make(tmp_path, "b")
    assert "6 images" in run.stdout and digest(a) == digest(b) and len(digest(a)) == 7
    c, _ = make(tmp_path, "c", seed=1)
    assert digest(c)["annotations.json"] != digest(a)["annotations.json"]
    d, _ = make(tmp_path, "d", split="train")
    assert digest(d)["annotations.json"] != digest(a)["annotations.json"]


def test_annotations_are_coco_with_the_models_class_ids(tmp_path):
    from PIL import Image
    from pycocotools.coco import COCO

    out, _ = make(tmp_path, "coco", model=NAMES[0], count=10, ids=SUBSET)
    data = json.loads((out / "annotations.json").read_text())
    coco = COCO(str(out / "annotations.json"))  # pycocotools accepts it
    assert len(coco.getImgIds()) == 10 and coco.getCatIds() == list(SUBSET)
    names = SET[NAMES[0]].class_names
    assert all(c["name"] == names[c["id"] - 1] != "N/A" for c in data["categories"])
    sizes = set()
    for img in data["images"]:
        with Image.open(out / "images" / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
        sizes.add((img["width"], img["height"]))
    assert len(sizes) == 10  # varied sizes and aspect ratios: the letterbox is exercised
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        img = data["images"][a["image_id"] - 1]
        assert a["category_id"] in SUBSET and w > 0 and h > 0
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]


def test_objects_vary_in_size_count_and_kind():
    import numpy as np

    from detlab.synthetic import render_image

    kinds = kind_table(spec(NAMES[2]))
    sides, counts, seen = [], [], set()
    for i in range(80):
        img, objects = render_image(np.random.default_rng([3, i]), kinds)
        counts.append(len(objects))
        for o in objects:
            sides.append(max(o["bbox"][2], o["bbox"][3]) / max(img.size))
            seen.add(o["category_id"])
    assert min(counts) <= 2 and max(counts) >= 6
    assert min(sides) < 0.05 and max(sides) > 0.5  # from ~16 px to more than half the image
    assert len(seen) >= 15


def test_kinds_are_distinct_and_class_sets_fit():
    assert len(set(KINDS)) == len(KINDS) == 48
    # the first 32 are the four first colours', in the order trained weights name them
    assert [k.name for k in KINDS[:3]] == ["red circle", "green square", "blue triangle"]
    assert {k.colour for k in KINDS[:32]} == {"red", "green", "blue", "yellow"}
    for name in NAMES:
        ids = class_ids(spec(name))
        assert len(ids) == len(set(ids)) and all(1 <= i <= len(SET[name].class_names) for i in ids)
    assert len(class_ids(spec(NAMES[1]))) == 7 and len(class_ids(spec(NAMES[2]))) == 20
    # without a recipe's ids: every named class (N/A placeholders left out), capped to the kinds on request
    coco = DataSpec("x", SET[NAMES[0]].class_names)
    assert len(class_ids(coco, cap=True)) == 48 and 12 not in class_ids(coco, cap=True)


def test_each_model_has_its_own_kinds_overlapping_where_label_sets_do(tmp_path):
    """The recipe's rule: a class named as an earlier one (any model's) is that one's kind, every other class a
    kind of its own; the data, the sliced class layer and the check sets follow it."""
    from detlab.recipe import head_map, read_recipe

    kinds = {n: kind_table(spec(n)) for n in NAMES}
    names = {n: {c: SET[n].class_names[c - 1] for c in kinds[n]} for n in NAMES}
    for a in NAMES:
        for b in NAMES:
            shared = {names[a][c] for c in kinds[a]} & {names[b][c] for c in kinds[b]}
            for ca, ka in kinds[a].items():
                for cb, kb in kinds[b].items():
                    assert (ka == kb) == (names[a][ca] == names[b][cb]), (a, ca, b, cb)
            if a != b and "aquarium" in a + b:
                assert not shared  # the aquarium model shares no label with the others
    vehicles_coco = {names[NAMES[2]][c] for c in kinds[NAMES[2]]} & {names[NAMES[0]][c] for c in kinds[NAMES[0]]}
    assert {"car", "truck", "bus", "motorcycle", "bicycle"} <= vehicles_coco
    recipe = read_recipe(ROOT / "training.yaml", SET)
    shared_ids = head_map(recipe, SET, NAMES[2], NAMES[0])
    assert {names[NAMES[2]][c] for c in shared_ids} == vehicles_coco
    assert all(names[NAMES[2]][c] == names[NAMES[0]][s] for c, s in shared_ids.items())
    assert head_map(recipe, SET, NAMES[1], NAMES[0]) == {}
    # a check set of the three draws every kind once and labels each model's own, by its own ids
    bodies, truth = check_set(count=4, seed=3, specs=[spec(n) for n in NAMES])
    by_box = {}
    for n in NAMES:
        for a in truth[n]["annotations"]:
            by_box.setdefault((a["image_id"], tuple(a["bbox"])), []).append((n, names[n][a["category_id"]]))
    assert all(len({label for _, label in v}) == 1 for v in by_box.values())  # one object, one name
    assert any(len(v) == 2 for v in by_box.values())  # a vehicles kind the COCO-subset model has too
    # the set's mixed split: every kind once, labelled by kind; each model's view keeps its own, by its ids
    import dataclasses

    from detlab.recipe import MIXED, mixed_spec, mixed_view
    from detlab.synthetic import make_dataset

    recipe = dataclasses.replace(recipe, data=tmp_path)
    mixed = mixed_spec(recipe, SET)
    assert len(mixed.class_names) == len({k for n in NAMES for k in kinds[n].values()}) == 24 + 12 + 7
    coco = make_dataset(mixed, "val", 4, 0, recipe.dataset(MIXED, "val"))
    for n in NAMES:
        view = json.loads((mixed_view(recipe, SET, n) / "annotations.json").read_text())
        mine = {k.name: c for c, k in kinds[n].items()}
        expected = [
            mine[mixed.class_names[a["category_id"] - 1]]
            for a in coco["annotations"]
            if mixed.class_names[a["category_id"] - 1] in mine
        ]
        assert [a["category_id"] for a in view["annotations"]] == expected
    assert len(coco["annotations"]) > max(
        len(json.loads((mixed_view(recipe, SET, n) / "annotations.json").read_text())["annotations"]) for n in NAMES
    )


def test_check_set_annotates_every_models_objects():
    specs = [spec(n) for n in NAMES]
    bodies, truth = check_set(count=3, seed=5, specs=specs)
    again, truth2 = check_set(count=3, seed=5, specs=specs)
    assert bodies == again and truth == truth2
    coco = truth[NAMES[0]]["annotations"]
    aquarium = truth[NAMES[1]]["annotations"]
    assert {a["category_id"] for a in coco} <= set(SUBSET)
    assert len(coco) >= len(aquarium) and all(1 <= a["category_id"] <= 7 for a in aquarium)
