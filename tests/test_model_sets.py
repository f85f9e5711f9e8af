"""Model sets other than the shipped one: any names, classes, count and effdet architecture, mixed in one set.

Built from seeded random weights (``checkpoints.generate_model_set``): a one-model set, and a mixed set
of two D0 models and one ``tf_efficientdet_d1`` (640 px, TensorFlow "same" padding). Every exact optimization
runs the mixed set and gives the baseline's raw outputs within its declared tolerance; the path stacks
the models of one architecture and runs the other beside them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import requests
import torch
import yaml

from detlab import build
from detlab.checkpoints import generate_model_set
from helpers import IMAGES, PHOTOS, ROOT, assert_schema, mar_options, start
from multidet.config import Settings
from multidet.envelopes import RequestOptions
from multidet.modelset import read_model_set
from multidet.optimizations import OPTIMIZATIONS, build_optimization, list_optimizations
from multidet.pipeline import Detector
from multidet.quality import raw_difference

CPU = torch.device("cpu")
MIXED = [
    ("pets", "efficientdet_d0", ["cat", "dog", "rabbit"]),
    ("signs", "tf_efficientdet_d1", ["stop", "yield", "speed limit", "no entry", "crossing"]),
    ("birds", "efficientdet_d0", ["owl", "gull", "crow", "swan"]),
]


def make_set(folder, specs, thresholds=None):
    """Seeded random models, their BatchNorm statistics from one photo (one float64 pass per model: about
    4 s for a D0 on 2 cores, four photos took 15 s)."""
    return generate_model_set(specs, folder, [p.read_bytes() for p in PHOTOS[:1]], seed=11, thresholds=thresholds)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return make_set(tmp_path_factory.mktemp("mixed"), MIXED).source


@pytest.fixture(scope="module")
def mixed_baseline(mixed):
    return Detector.from_model_set(mixed, Settings(), CPU)


@pytest.fixture(scope="module")
def mixed_images(photos):
    return list(photos.values())[:2]


def raw_outputs(detector: Detector, images: list[bytes]) -> dict[int, tuple]:
    """Per model index of the set: its raw class and box outputs on ``images``."""
    from multidet.decode import decode_image

    batches = detector.prepare([decode_image(b, 10**8) for b in images])
    out = {}
    with torch.inference_mode():
        for g in detector.groups:
            got = g.optimization.forward(batches[g.preprocessor.key].tensor, range(len(g.indices)))
            out.update({g.indices[j]: v for j, v in got.items()})
    return out


def test_a_mixed_set_runs_each_architecture_at_its_own_size(mixed_baseline, mixed_images):
    det = mixed_baseline
    assert [(g.architecture, g.indices) for g in det.groups] == [
        ("efficientdet_d0", [0, 2]),
        ("tf_efficientdet_d1", [1]),
    ]
    assert sorted(p.input_size for p in det.preprocessors) == [(512, 512), (640, 640)]  # one letterbox per size
    result = det.predict_one(mixed_images[0], RequestOptions(threshold=0.0))
    assert_schema(result, models=("pets", "signs", "birds"))
    assert [m["num_classes"] for m in result["models"]] == [3, 5, 4]
    labels = {m: {d["label"] for d in result["detections"] if d["model"] == m} for m in ("pets", "signs", "birds")}
    assert labels["pets"] <= {"cat", "dog", "rabbit"} and labels["signs"] <= set(MIXED[1][2]) and all(labels.values())
    one = det.predict_one(mixed_images[0], RequestOptions(threshold=0.0, models=("signs",)))
    assert [m["name"] for m in one["models"]] == ["signs"]
    assert {d["model"] for d in one["detections"]} == {"signs"}
    with pytest.raises(AttributeError, match="use Detector.groups"):
        det.optimization  # noqa: B018  (one optimization per architecture: there is no single one)


EXACT = [
    name
    for name in list_optimizations(device=CPU, tier="exact", servable=True)
    if name != "baseline"
    and not OPTIMIZATIONS[name].chooses  # auto: its own test below
    and OPTIMIZATIONS[name].build_minutes < 1  # compiled ones: minutes per network (test_integration serves them)
    and OPTIMIZATIONS[name].raw_tolerance is not None
]


@pytest.mark.parametrize("name", EXACT)
def test_every_exact_path_gives_the_baselines_raw_outputs_on_a_mixed_set(
    name, mixed, mixed_baseline, mixed_images, tmp_path
):
    """Stacking paths (vmap, grouped, the grouped ONNX graph) stack the two D0 models and run the D1 beside."""
    build_optimization(name, mixed_baseline.models, tmp_path, build.context(photos=IMAGES))
    det = Detector.from_model_set(mixed, Settings(optimization=name), CPU, tmp_path)
    assert [len(g.optimization.models) for g in det.groups] == [2, 1] and det.description == name
    want, got = raw_outputs(mixed_baseline, mixed_images), raw_outputs(det, mixed_images)
    for k in range(3):
        diff = raw_difference(want[k][0] + want[k][1], got[k][0] + got[k][1])
        assert diff <= OPTIMIZATIONS[name].raw_tolerance, (name, k, diff)
    assert_schema(det.predict_one(mixed_images[0]), models=("pets", "signs", "birds"))


def test_auto_chooses_for_the_set_it_is_given(mixed, mixed_baseline, mixed_images, tmp_path):
    """auto times and checks its candidates per architecture of the set; the response names what it chose."""
    build_optimization("auto", mixed_baseline.models, tmp_path, build.context(photos=IMAGES))
    det = Detector.from_model_set(mixed, Settings(optimization="auto"), CPU, tmp_path)
    chosen = [g.optimization.chosen.name for g in det.groups]
    assert all(OPTIMIZATIONS[c].tier == "exact" for c in chosen)
    assert all({r["optimization"] for r in g.optimization.table} >= {"baseline"} for g in det.groups)
    want = f"auto:{chosen[0]}" if len(set(chosen)) == 1 else f"efficientdet_d0=auto:{chosen[0]},"
    assert det.predict_one(mixed_images[0])["optimization"].startswith(want)


def test_a_one_model_set_and_its_stacking_paths(tmp_path, photos):
    model_set = make_set(tmp_path / "one", [("solo", "efficientdet_d0", ["thing"])])
    base = Detector.from_model_set(model_set.source, Settings(), CPU)
    image = list(photos.values())[:1]
    want = raw_outputs(base, image)
    for name in ("vmap_backbone", "grouped"):
        det = Detector.from_model_set(model_set.source, Settings(optimization=name), CPU)
        got = raw_outputs(det, image)
        assert raw_difference(want[0][0] + want[0][1], got[0][0] + got[0][1]) <= OPTIMIZATIONS[name].raw_tolerance
    result = base.predict_one(image[0], RequestOptions(threshold=0.0))
    assert_schema(result, models=("solo",))
    assert {d["label"] for d in result["detections"]} == {"thing"}


def test_a_models_own_threshold_applies_unless_the_request_gives_one(tmp_path, photos):
    model_set = make_set(
        tmp_path / "thr",
        [("low", "efficientdet_d0", ["a", "b"]), ("high", "efficientdet_d0", ["c", "d"])],
        thresholds={"low": 0.0, "high": 1.0},
    )
    assert [e.threshold for e in read_model_set(model_set.source)] == [0.0, 1.0]
    det = Detector.from_model_set(model_set.source, Settings(threshold=0.5), CPU)
    body = list(photos.values())[0]
    counts = {m["name"]: m["count"] for m in det.predict_one(body)["models"]}
    assert counts["low"] > 0 and counts["high"] == 0  # each model at its own threshold, not the service's
    counts = {m["name"]: m["count"] for m in det.predict_one(body, RequestOptions(threshold=0.0))["models"]}
    assert counts["low"] > 0 and counts["high"] > 0  # the request's threshold wins


def test_create_mar_names_the_bad_entry_and_exits_2(tmp_path, mixed):
    entries = yaml.safe_load(mixed.read_text())["models"]
    for e in entries:
        for f in (e["weights"], e["weights"].replace(".pth", ".json")):  # weights + their metadata (classes)
            shutil.copy2(mixed.parent / f, tmp_path / f)
    entries[1]["architecture"] = "efficientdet_d0"  # the D1's weights under a D0 entry
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"models": entries}))
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "create_mar.py"), "--model-set", str(tmp_path / "bad.yaml")]
        + ["--export-path", str(tmp_path / "store"), "--optimization", "baseline"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "bad.yaml" in r.stderr and "signs" in r.stderr, r.stderr
    assert not (tmp_path / "store" / "all.mar").exists()


@pytest.mark.integration
def test_four_users_models_of_two_architectures_served_by_torchserve(tmp_path, mixed, photos):
    """A user's models file: four detectors of their own names and classes, bare effdet state_dicts (no
    metadata beside them), one D0 added as one more entry; built into a MAR and served by a real TorchServe."""
    entries = yaml.safe_load(mixed.read_text())["models"]
    user = tmp_path / "user"
    user.mkdir()
    for e, (_, _, classes) in zip(entries, MIXED):
        state = torch.load(mixed.parent / e["weights"], weights_only=True)
        torch.save(dict(state), user / f"{e['name']}.pth")  # a bare state_dict: no project metadata
        e.update(weights=f"{e['name']}.pth", classes=classes)
    entries.append({**entries[0], "name": "more_pets", "classes": ["hamster", "ferret", "parrot"]})
    (user / "models.yaml").write_text(yaml.safe_dump({"models": entries}))
    ts = start(tmp_path / "ts", mar_options(optimization="grouped", model_set=user / "models.yaml"))
    try:
        body = list(photos.values())[0]
        r = requests.put(f"{ts.inference}/predictions/all", data=body, headers={"X-Threshold": "0"}, timeout=120)
        assert r.status_code == 200, r.text
        result = r.json()
        assert_schema(result, models=("pets", "signs", "birds", "more_pets"))
        assert result["optimization"] == "grouped"
        got = {m: {d["label"] for d in result["detections"] if d["model"] == m} for m in ("more_pets", "signs")}
        assert got["more_pets"] <= {"hamster", "ferret", "parrot"} and got["signs"] <= set(MIXED[1][2])
        assert {m["name"]: m["num_classes"] for m in result["models"]} == {
            "pets": 3,
            "signs": 5,
            "birds": 4,
            "more_pets": 3,
        }
    finally:
        ts.stop()
