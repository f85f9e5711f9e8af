"""Checkpoints and model sets: deterministic, verified (sha256 + architecture), safe to load, importable;
a model set file checked entry by entry with errors that name the entry."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from detlab.checkpoints import CheckpointMeta, load_checkpoint, save_checkpoint
from helpers import CHECKPOINTS, NAMES, RANDOM, ROOT, SHIPPED
from multidet.modelset import ModelSetError, load_models, read_model_set
from multidet.weights import CheckpointError, check_architecture, num_classes_of, read_state_dict, safe_torch_load

SCRIPT = [sys.executable, str(ROOT / "scripts" / "generate_checkpoints.py")]
ONE = NAMES[1]  # a model of the default set, for the single-file tests


@pytest.fixture
def ckpt_copy(tmp_path):
    for f in CHECKPOINTS.glob(f"{ONE}.*"):
        shutil.copy2(f, tmp_path)
    return tmp_path


def write_set(path, entries) -> object:
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


def test_generated_set_mirrors_the_default_set():
    """checkpoints/models.yaml: every model of models.yaml, same names, architectures and classes, seeded."""
    shipped, generated = load_models(read_model_set(SHIPPED)), load_models(read_model_set(RANDOM))
    assert [m.name for m in generated] == [m.name for m in shipped] == list(NAMES)
    for k, (s, g) in enumerate(zip(shipped, generated)):
        meta = CheckpointMeta.read(CHECKPOINTS / f"{g.name}.json")
        assert g.architecture == s.architecture and g.class_names == s.class_names and not g.net.training
        assert meta.seed == k and len(meta.sha256) == 64 and meta.source == "generated"


def test_regeneration_is_byte_identical(tmp_path):
    """Same seed, same bytes: a fresh run reproduces `make checkpoints`' sha256."""
    args = SCRIPT + ["--out", str(tmp_path), "--models", ONE, "--seed", "1"]  # seed 1 = ONE's seed in the full set
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert f"[1/1] {ONE}" in out  # progress
    fresh = CheckpointMeta.read(tmp_path / f"{ONE}.json")
    assert fresh.sha256 == CheckpointMeta.read(CHECKPOINTS / f"{ONE}.json").sha256
    assert read_model_set(tmp_path / "models.yaml").names == (ONE,)
    assert "up to date" in subprocess.run(args, capture_output=True, text=True, check=True).stdout


def test_tampered_checkpoint_is_refused(ckpt_copy):
    pth = ckpt_copy / f"{ONE}.pth"
    data = bytearray(pth.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pth.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="integrity check"):
        load_checkpoint(ckpt_copy, ONE)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(ckpt_copy):
    """Even with a matching sha256, torch.load(weights_only=True) refuses code in the pickle."""
    pth = ckpt_copy / f"{ONE}.pth"
    torch.save({"weights": torch.zeros(1), "payload": Exploit()}, pth)
    meta = json.loads((ckpt_copy / f"{ONE}.json").read_text())
    meta["sha256"] = __import__("hashlib").sha256(pth.read_bytes()).hexdigest()
    (ckpt_copy / f"{ONE}.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(ckpt_copy, ONE)


def test_wrong_architecture_is_refused():
    state = torch.load(CHECKPOINTS / f"{ONE}.pth", weights_only=True)
    n = num_classes_of(state, "efficientdet_d0")
    state.pop("box_net.predict.conv_pw.weight")
    with pytest.raises(CheckpointError, match="do not match"):
        check_architecture(state, "efficientdet_d0", n)


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="make checkpoints"):
        load_checkpoint(tmp_path, NAMES[0])


def test_import_train_checkpoint(tmp_path):
    """effdet train.py's format (state_dict + state_dict_ema, module. prefix) imports as a verified checkpoint,
    under any name, with its class names, as a one-model set."""
    state = torch.load(CHECKPOINTS / f"{NAMES[2]}.pth", weights_only=True)
    n = num_classes_of(state, "efficientdet_d0")
    ema = {f"module.{k}": v.clone() for k, v in state.items()}
    torch.save(
        {"epoch": 3, "state_dict": {k: torch.zeros_like(v) for k, v in state.items()}, "state_dict_ema": ema},
        tmp_path / "train.pth.tar",
    )
    imported = read_state_dict(tmp_path / "train.pth.tar")
    assert all(torch.equal(imported[k], state[k]) for k in state)
    (tmp_path / "classes.txt").write_text("\n".join(f"thing {i}" for i in range(n)) + "\n")
    out = tmp_path / "ckpts"
    subprocess.run(
        SCRIPT
        + ["--out", str(out), "--from", str(tmp_path / "train.pth.tar"), "--name", "roads"]
        + ["--class-names", str(tmp_path / "classes.txt")],
        check=True,
        capture_output=True,
    )
    meta, _ = load_checkpoint(out, "roads")
    assert meta.source == "import:train.pth.tar" and meta.seed is None and meta.class_names[1] == "thing 1"
    [model] = load_models(read_model_set(out / "models.yaml"))
    assert model.name == "roads" and model.num_classes == n


def test_import_with_wrong_class_count_fails_clearly(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n")
    r = subprocess.run(
        SCRIPT
        + ["--out", str(tmp_path), "--from", str(CHECKPOINTS / f"{ONE}.pth"), "--name", "x"]
        + ["--class-names", str(tmp_path / "classes.txt")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "names 2" in r.stderr and "one name per class" in r.stderr


def test_pretrained_offline_fails_clearly(tmp_path):
    env = dict(
        os.environ,
        TORCH_HOME=str(tmp_path / "hub"),
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
    )
    r = subprocess.run(
        SCRIPT + ["--out", str(tmp_path), "--pretrained", "--models", NAMES[0]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2 and "could not download" in r.stderr and "offline" in r.stderr
    assert not (tmp_path / f"{NAMES[0]}.pth").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_safe_load_plain_pickle_refused(tmp_path):
    path = tmp_path / "x.pth"
    with open(path, "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(CheckpointError):
        safe_torch_load(path)


def test_shipped_trained_weights_are_verified_safetensors_with_their_record():
    """The default set's weights are the trained models a fresh clone serves: safetensors, sha256-checked,
    with how they were made (dataset, class ids, seed, steps) and the val mAP they reached."""
    for entry, model in zip(read_model_set(SHIPPED), load_models(read_model_set(SHIPPED))):
        meta = CheckpointMeta.read(entry.weights.with_suffix(".json"))
        assert entry.weights.suffix == ".safetensors" and meta.source == "trained" and not model.net.training
        assert tuple(meta.class_names) == model.class_names and model.trained_ids
        t = meta.training
        assert t["seed"] is not None and t["dataset_sha256"] and t["wall_s"] >= 0
        assert t["steps"] > 0 or "sliced from it" in t["start"]  # 0 steps: its class layer sliced from another
        assert (
            t["val"]["model"] == entry.name and t["val"]["images"] >= 200 and 0 < t["val"]["map"] <= t["val"]["map50"]
        )


def test_safetensors_round_trip_and_tamper_check(tmp_path):
    state = torch.load(CHECKPOINTS / f"{ONE}.pth", weights_only=True)
    classes = [f"c{i}" for i in range(num_classes_of(state, "efficientdet_d0"))]
    meta = save_checkpoint(
        tmp_path, "mine", "efficientdet_d0", classes, state, seed=3, source="trained", fmt="safetensors"
    )
    assert meta.weights_file == "mine.safetensors" and not (tmp_path / "mine.pth").exists()
    loaded, net = load_checkpoint(tmp_path, "mine")
    assert loaded == meta and all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    path = tmp_path / meta.weights_file
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="integrity check"):
        load_checkpoint(tmp_path, "mine")


# -- the model set file ------------------------------------------------------------------------------
def test_a_set_of_the_users_own_models_and_classes(tmp_path):
    """Bare effdet state_dicts under the user's names, classes inline or from a file, a per-model threshold."""
    for name in ("pets", "traffic"):
        shutil.copy2(CHECKPOINTS / f"{ONE}.pth", tmp_path / f"{name}.pth")  # no metadata beside them
    n = num_classes_of(torch.load(CHECKPOINTS / f"{ONE}.pth", weights_only=True), "efficientdet_d0")
    (tmp_path / "traffic.txt").write_text("\n".join(f"sign {i}" for i in range(n)))
    path = write_set(
        tmp_path / "mine.yaml",
        [
            {"name": "pets", "architecture": "efficientdet_d0", "weights": "pets.pth",
             "classes": [f"pet {i}" for i in range(n)], "threshold": 0.4},
            {"name": "traffic", "architecture": "efficientdet_d0", "weights": "traffic.pth",
             "classes_file": "traffic.txt"},
        ],
    )  # fmt: skip
    pets, traffic = load_models(read_model_set(path))
    assert (pets.name, pets.class_names[0], pets.threshold) == ("pets", "pet 0", 0.4)
    assert (traffic.name, traffic.class_names[-1], traffic.threshold) == ("traffic", f"sign {n - 1}", None)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": "Bad Name"}, "must match"),
        ({"architecture": "efficientdet_d99"}, "unknown architecture"),
        ({"weights": "missing.pth"}, "not found"),
        ({"classes": ["a", "b"]}, "2 class names, but the weights have"),
        ({"threshold": 2}, "threshold"),
        ({"colour": "red"}, "unknown key"),
        ({"sha256": "0" * 64}, "integrity check"),
        ({"classes": None}, "no class names"),
    ],
)
def test_each_mistake_in_an_entry_is_named(tmp_path, change, message):
    shutil.copy2(CHECKPOINTS / f"{ONE}.pth", tmp_path / "m.pth")
    n = num_classes_of(torch.load(tmp_path / "m.pth", weights_only=True), "efficientdet_d0")
    entry = {"name": "mine", "architecture": "efficientdet_d0", "weights": "m.pth", "classes": list("x" * n)}
    entry = {k: v for k, v in {**entry, **change}.items() if v is not None}
    path = write_set(tmp_path / "set.yaml", [entry])
    with pytest.raises(ModelSetError, match=message) as err:
        load_models(read_model_set(path))
    assert "set.yaml" in str(err.value) and ("entry 1" in str(err.value) or "mine" in str(err.value))


def test_duplicate_names_and_empty_sets_are_refused(tmp_path):
    shutil.copy2(CHECKPOINTS / f"{ONE}.pth", tmp_path / "m.pth")
    entry = {"name": "a", "architecture": "efficientdet_d0", "weights": "m.pth"}
    with pytest.raises(ModelSetError, match="duplicate name"):
        read_model_set(write_set(tmp_path / "dup.yaml", [entry, entry]))
    with pytest.raises(ModelSetError, match="non-empty list"):
        read_model_set(write_set(tmp_path / "empty.yaml", []))
