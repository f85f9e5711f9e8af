"""Fine-tuning (multidet.training) and evaluation (scripts/evaluate.py) on tiny datasets."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch

from helpers import IMAGES, NAMES, ROOT, SHIPPED
from multidet.checkpoints import CheckpointMeta, load_checkpoint
from multidet.config import Settings
from multidet.modelset import read_model_set
from multidet.pipeline import Detector
from multidet.synthetic import DataSpec, make_dataset
from multidet.training import TrainConfig, train

SET = read_model_set(SHIPPED)
MODEL = NAMES[1]  # trained again from the first model, as the recipe does
SPEC = DataSpec(MODEL, SET[MODEL].class_names)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_dataset(SPEC, "train", 8, 0, root / "train", IMAGES)
    make_dataset(SPEC, "val", 6, 0, root / "val", IMAGES)
    return root


def config(tiny, out, **kw):
    base = dict(
        model=MODEL,
        class_names=SPEC.class_names,
        architecture=SET[MODEL].architecture,
        train_dir=tiny / "train",
        val_dir=tiny / "val",
        out_dir=out,
        init=SHIPPED,
        init_model=NAMES[0],
        steps=8,
        batch_size=4,
        lr=1e-3,
        image_size=256,
        workers=0,
        eval_every=0,
        save_every=4,
        ema_decay=0.0,
        warmup_pct=0.2,
    )
    return TrainConfig(**{**base, **kw})


def test_a_few_steps_lower_the_loss_and_the_checkpoint_serves(tiny, tmp_path):
    rows = []
    result = train(config(tiny, tmp_path / "out"), rows.append)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert statistics.mean(losses[-3:]) < statistics.mean(losses[:3]), losses
    meta = CheckpointMeta.read(tmp_path / "out" / f"{MODEL}.json")
    assert meta == result.meta and meta.format == "safetensors" and meta.source == "trained"
    t = meta.training
    assert t["steps"] == 8 and t["seed"] == 0 and t["images"] == 8 and "class layer re-initialised" in t["start"]
    assert set(t["val"]) == {"model", "optimization", "map50", "map", "images"} and t["val"]["images"] == 6
    assert rows[-1]["final"] == t["val"]
    # the result loads (sha256, architecture) and serves through the whole data path
    load_checkpoint(tmp_path / "out", MODEL)
    det = Detector.from_model_set(tmp_path / "out" / "models.yaml", Settings(), torch.device("cpu"))
    assert t["class_ids"] == list(range(1, 8))  # what its data drew (check sets of the same kinds)
    body = next((tiny / "val" / "images").iterdir()).read_bytes()
    assert [m["name"] for m in det.predict_one(body)["models"]] == [MODEL]


def test_training_resumes_where_it_stopped(tiny, tmp_path):
    class Stop(Exception):
        pass

    def stop_at_4(row):
        if row.get("step") == 4:
            raise Stop

    cfg = config(tiny, tmp_path, steps=6, val_dir=None, save_every=2)
    with pytest.raises(Stop):
        train(cfg, stop_at_4)
    state = torch.load(tmp_path / f"{MODEL}.train.pt", weights_only=True)
    assert state["step"] == 4 and len(state["history"]) == 4
    rows = []
    result = train(cfg, rows.append)
    assert [r["step"] for r in rows] == [5, 6] and len(result.history) == 6
    assert result.history[:4] == state["history"]
    with pytest.raises(ValueError, match="another run"):
        train(config(tiny, tmp_path, steps=7, val_dir=None))


def test_from_scratch_needs_no_checkpoint_and_rejects_foreign_class_ids(tiny, tmp_path):
    result = train(config(tiny, tmp_path / "s", init=None, steps=2, val_dir=None))
    assert result.meta.training["start"] == "scratch"
    bad = tmp_path / "bad"
    make_dataset(DataSpec(NAMES[2], SET[NAMES[2]].class_names), "val", 2, 0, bad)  # ids up to 20, 7 classes
    with pytest.raises(ValueError, match="outside this model's 1..7"):
        train(config(tiny, tmp_path / "b", train_dir=bad, steps=1, val_dir=None))


def test_evaluate_script_reports_map_of_the_trained_model(tiny, tmp_path):
    out = tmp_path / "eval.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "evaluate.py"),
            "--data",
            str(tiny / "val"),
            "--model",
            MODEL,
            "--optimization",
            "baseline",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.read_text())
    assert json.loads(run.stdout.strip().splitlines()[-1]) == result
    assert set(result) == {"model", "optimization", "map50", "map", "images"}
    assert result["model"] == MODEL and result["images"] == 6 and result["optimization"] == "baseline"
    assert result["map50"] >= 0.5 and 0 < result["map"] <= result["map50"]  # the shipped model finds them
