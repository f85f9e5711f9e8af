"""Checkpoints: deterministic, verified (sha256 + architecture), safe to load, importable."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import CHECKPOINTS, ROOT, WEIGHTS
from multidet.checkpoints import (
    CheckpointError,
    CheckpointMeta,
    import_state_dict,
    load_checkpoint,
    num_classes_of,
    safe_torch_load,
)
from multidet.config import MODEL_NAMES, MODEL_SPECS

SCRIPT = [sys.executable, str(ROOT / "scripts" / "generate_checkpoints.py")]


@pytest.fixture
def ckpt_copy(tmp_path):
    for f in CHECKPOINTS.glob("efficientdet_d0_aquarium.*"):
        shutil.copy2(f, tmp_path)
    return tmp_path


def test_metadata_of_generated_checkpoints():
    for name in MODEL_NAMES:
        meta, net = load_checkpoint(CHECKPOINTS, name)
        assert meta.architecture == "efficientdet_d0" and meta.image_size == 512
        assert meta.num_classes == MODEL_SPECS[name].num_classes == net.config.num_classes
        assert meta.class_names == list(MODEL_SPECS[name].class_names)
        assert meta.seed == MODEL_NAMES.index(name) and len(meta.sha256) == 64 and meta.source == "generated"
        assert not net.training


def test_regeneration_is_byte_identical(tmp_path):
    """Same seed, same bytes: a fresh run reproduces `make checkpoints`' sha256."""
    out = subprocess.run(
        SCRIPT + ["--out", str(tmp_path), "--models", "efficientdet_d0_aquarium"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "[1/1] efficientdet_d0_aquarium" in out  # progress
    fresh = CheckpointMeta.read(tmp_path / "efficientdet_d0_aquarium.json")
    assert fresh.sha256 == CheckpointMeta.read(CHECKPOINTS / "efficientdet_d0_aquarium.json").sha256
    rerun = subprocess.run(
        SCRIPT + ["--out", str(tmp_path), "--models", "efficientdet_d0_aquarium"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "up to date" in rerun


def test_tampered_checkpoint_is_refused(ckpt_copy):
    pth = ckpt_copy / "efficientdet_d0_aquarium.pth"
    data = bytearray(pth.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pth.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="integrity check"):
        load_checkpoint(ckpt_copy, "efficientdet_d0_aquarium")


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(ckpt_copy):
    """Even with a matching sha256, torch.load(weights_only=True) refuses code in the pickle."""
    pth = ckpt_copy / "efficientdet_d0_aquarium.pth"
    torch.save({"weights": torch.zeros(1), "payload": Exploit()}, pth)
    meta = json.loads((ckpt_copy / "efficientdet_d0_aquarium.json").read_text())
    meta["sha256"] = __import__("hashlib").sha256(pth.read_bytes()).hexdigest()
    (ckpt_copy / "efficientdet_d0_aquarium.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(ckpt_copy, "efficientdet_d0_aquarium")


def test_wrong_architecture_is_refused(tmp_path):
    state = torch.load(CHECKPOINTS / "efficientdet_d0_aquarium.pth", weights_only=True)
    state.pop("box_net.predict.conv_pw.weight")
    from multidet.checkpoints import check_architecture

    with pytest.raises(CheckpointError, match="do not match"):
        check_architecture(state, 7)


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="make checkpoints"):
        load_checkpoint(tmp_path, "efficientdet_d0_coco")


def test_import_train_checkpoint(tmp_path):
    """effdet train.py's format (state_dict + state_dict_ema, module. prefix) imports as a verified checkpoint."""
    state = torch.load(CHECKPOINTS / "efficientdet_d0_vehicles.pth", weights_only=True)
    ema = {f"module.{k}": v.clone() for k, v in state.items()}
    torch.save(
        {"epoch": 3, "state_dict": {k: torch.zeros_like(v) for k, v in state.items()}, "state_dict_ema": ema},
        tmp_path / "train.pth.tar",
    )
    imported = import_state_dict(tmp_path / "train.pth.tar")
    assert num_classes_of(imported) == 20 and all(torch.equal(imported[k], state[k]) for k in state)
    out = tmp_path / "ckpts"
    subprocess.run(
        SCRIPT + ["--out", str(out), "--from", str(tmp_path / "train.pth.tar"), "--models", "efficientdet_d0_vehicles"],
        check=True,
        capture_output=True,
    )
    meta, _ = load_checkpoint(out, "efficientdet_d0_vehicles")
    assert meta.source == "import:train.pth.tar" and meta.seed is None


def test_import_with_wrong_class_count_fails_clearly(tmp_path):
    r = subprocess.run(
        SCRIPT
        + [
            "--out",
            str(tmp_path),
            "--from",
            str(CHECKPOINTS / "efficientdet_d0_aquarium.pth"),
            "--models",
            "efficientdet_d0_vehicles",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "7 classes" in r.stderr and "--class-names" in r.stderr


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
        SCRIPT + ["--out", str(tmp_path), "--pretrained", "--models", "efficientdet_d0_coco"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2 and "could not download" in r.stderr and "offline" in r.stderr
    assert not (tmp_path / "efficientdet_d0_coco.pth").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_safe_load_plain_pickle_refused(tmp_path):
    path = tmp_path / "x.pth"
    with open(path, "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(CheckpointError):
        safe_torch_load(path)


def test_shipped_trained_weights_are_verified_safetensors_with_their_record():
    """weights/ holds the trained models a fresh clone serves: safetensors, sha256-checked, with how
    they were made (dataset, seed, steps) and the val mAP they reached."""
    for name in MODEL_NAMES:
        meta, net = load_checkpoint(WEIGHTS, name)
        assert meta.format == "safetensors" and meta.source == "trained" and (WEIGHTS / meta.weights_file).exists()
        assert meta.class_names == list(MODEL_SPECS[name].class_names) and not net.training
        t = meta.training
        assert t["steps"] > 0 and t["seed"] is not None and t["dataset_sha256"] and t["wall_s"] > 0
        assert t["val"]["model"] == name and t["val"]["images"] >= 200 and 0 < t["val"]["map"] <= t["val"]["map50"]


def test_safetensors_round_trip_and_tamper_check(tmp_path):
    from multidet.checkpoints import save_checkpoint

    state = torch.load(CHECKPOINTS / "efficientdet_d0_aquarium.pth", weights_only=True)
    meta = save_checkpoint(
        tmp_path,
        MODEL_SPECS["efficientdet_d0_aquarium"],
        state,
        seed=3,
        source="trained",
        fmt="safetensors",
        training={"steps": 1},
    )
    assert (
        meta.weights_file == "efficientdet_d0_aquarium.safetensors"
        and not (tmp_path / "efficientdet_d0_aquarium.pth").exists()
    )
    loaded, net = load_checkpoint(tmp_path, "efficientdet_d0_aquarium")
    assert loaded == meta and all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    path = tmp_path / meta.weights_file
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="integrity check"):
        load_checkpoint(tmp_path, "efficientdet_d0_aquarium")
