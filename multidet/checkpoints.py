"""Checkpoints: effdet's own state_dict, each with a JSON metadata file beside it.

    weights/efficientdet_d0_coco.safetensors  trained, shipped in git (safetensors: tensors only)
    checkpoints/efficientdet_d0_coco.pth      seeded random, generated (torch.save(state_dict))
    <dir>/efficientdet_d0_coco.json           {name, architecture, image_size, num_classes, class_names,
                                               seed, source, sha256, format, training}

``format`` names the weights file (``pth`` or ``safetensors``); ``training`` records how a trained
checkpoint was made (dataset, seed, steps, val mAP). Loading verifies the sha256 first, reads .pth
files only with ``torch.load(weights_only=True)``, and checks the architecture (every key and shape)
before the weights reach a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from effdet import get_efficientdet_config
from effdet.efficientdet import EfficientDet

from .config import ARCHITECTURE, IMAGE_SIZE, ModelSpec

FORMATS = ("pth", "safetensors")
NUM_ANCHORS = 9  # num_scales (3) x aspect ratios (3) for efficientdet_d0
CLASS_HEAD = "class_net.predict.conv_pw"  # the only layer whose shape depends on num_classes


class CheckpointError(RuntimeError):
    """A checkpoint is missing, tampered with, unsafe or of the wrong architecture."""


@dataclass(frozen=True)
class CheckpointMeta:
    name: str
    architecture: str
    image_size: int
    num_classes: int
    class_names: list[str]
    seed: int | None
    source: str
    sha256: str
    format: str = "pth"  # the weights file: <name>.pth or <name>.safetensors
    training: dict | None = None  # how a trained checkpoint was made (dataset, steps, val mAP)

    @property
    def weights_file(self) -> str:
        return f"{self.name}.{self.format}"

    @classmethod
    def read(cls, path: Path) -> CheckpointMeta:
        optional = {"format", "training"}
        try:
            raw = json.loads(path.read_text())
            meta = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k not in optional or k in raw})
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path} not found: run `make checkpoints` first") from exc
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid checkpoint metadata: {exc}") from exc
        if meta.format not in FORMATS:
            raise CheckpointError(f"{path}: format {meta.format!r} is not one of {FORMATS}")
        return meta


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_config(num_classes: int, image_size: int = IMAGE_SIZE):
    config = get_efficientdet_config(ARCHITECTURE)
    config.num_classes = num_classes
    config.image_size = (image_size, image_size)
    return config


def build_network(num_classes: int, image_size: int = IMAGE_SIZE) -> EfficientDet:
    """An EfficientDet-D0 with randomly initialised weights; never touches the network.

    The BiFPN's resampling is built for ``image_size``; the weights do not depend on it, so weights
    trained at one size load into a network built for another (training runs smaller, serving at 512)."""
    return EfficientDet(model_config(num_classes, image_size), pretrained_backbone=False)


def generate_state_dict(
    num_classes: int,
    seed: int,
    calibration: torch.Tensor | None = None,
) -> OrderedDict[str, torch.Tensor]:
    """Seeded, deterministic weights: the same seed and calibration batch give byte-identical tensors.

    effdet's random init with BatchNorm's identity statistics leaves the heads' inputs ~1e-5 in
    scale, so every score is the prior (0.0100 +- 1e-6) and every box an anchor. With a
    ``calibration`` batch (normalised NCHW images) the BatchNorm running statistics are set from
    real activations, as after training, so outputs have a realistic spread. Still untrained.
    """
    torch.manual_seed(seed)
    net = build_network(num_classes)
    if calibration is not None:
        calibrate_batchnorm(net, calibration)
    return net.state_dict()


def calibrate_batchnorm(net: torch.nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running mean/var to the statistics of ``images`` (one float64 pass)."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives exactly this batch's statistics
    net.double().train()
    with torch.no_grad():
        net(images.double())
    net.float().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.01  # effdet's norm_kwargs


def pretrained_state_dict(num_classes: int, seed: int) -> OrderedDict[str, torch.Tensor]:
    """effdet's pretrained COCO weights; for other class counts the class head is re-initialised."""
    from effdet import create_model

    try:
        net = create_model(ARCHITECTURE, bench_task="", num_classes=90, pretrained=True)
    except Exception as exc:  # urllib/hub errors vary by version; all mean the same to the user
        raise CheckpointError(
            f"could not download effdet's pretrained {ARCHITECTURE} weights ({type(exc).__name__}: {exc}); "
            "this machine may be offline. Run without --pretrained to generate seeded checkpoints, "
            "or pass --from PATH with a checkpoint you have."
        ) from exc
    if num_classes != 90:
        torch.manual_seed(seed)
        net.reset_head(num_classes=num_classes)
    return net.state_dict()


def import_state_dict(path: Path) -> OrderedDict[str, torch.Tensor]:
    """A user's effdet checkpoint: bare state_dict, or effdet train.py's dict with
    ``state_dict_ema`` (preferred) / ``state_dict``. ``module.``/``model.`` prefixes are removed."""
    obj = safe_torch_load(Path(path))
    if isinstance(obj, Mapping) and "state_dict_ema" in obj and obj["state_dict_ema"]:
        obj = obj["state_dict_ema"]
    elif isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no effdet state_dict")
    out = OrderedDict()
    for key, value in obj.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def num_classes_of(state_dict: Mapping[str, torch.Tensor]) -> int:
    key = f"{CLASS_HEAD}.weight"
    if key not in state_dict:
        raise CheckpointError(f"not an {ARCHITECTURE} state_dict: {key} is missing")
    out_channels = state_dict[key].shape[0]
    if out_channels % NUM_ANCHORS:
        raise CheckpointError(f"{key} has {out_channels} outputs, not a multiple of {NUM_ANCHORS} anchors")
    return out_channels // NUM_ANCHORS


def safe_torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused by torch.load(weights_only=True): it contains code or objects "
            f"other than tensors ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc


def load_safetensors(path: Path) -> OrderedDict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return OrderedDict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def check_architecture(state_dict: Mapping[str, torch.Tensor], num_classes: int) -> EfficientDet:
    """Build the network and load ``state_dict`` strictly; every key and shape must match."""
    net = build_network(num_classes)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in expected if k in state_dict and expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"weights do not match {ARCHITECTURE} with {num_classes} classes: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}), {len(wrong)} with other shapes (e.g. {wrong[:2]})"
        )
    net.load_state_dict(state_dict, strict=True)
    return net.eval()


def save_checkpoint(
    out_dir: Path,
    spec: ModelSpec,
    state_dict: Mapping[str, torch.Tensor],
    *,
    seed: int | None,
    source: str,
    fmt: str = "pth",
    training: dict | None = None,
) -> CheckpointMeta:
    num_classes = num_classes_of(state_dict)
    if num_classes != spec.num_classes:
        raise CheckpointError(f"{spec.name} needs {spec.num_classes} classes, the weights have {num_classes}")
    if fmt not in FORMATS:
        raise CheckpointError(f"format must be one of {FORMATS}, got {fmt!r}")
    check_architecture(state_dict, num_classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = out_dir / f"{spec.name}.{fmt}", out_dir / f".{spec.name}.{fmt}.tmp"
    tensors = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state_dict.items())
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata={"name": spec.name, "architecture": ARCHITECTURE})
    else:
        torch.save(tensors, tmp)
    meta = CheckpointMeta(
        name=spec.name,
        architecture=ARCHITECTURE,
        image_size=IMAGE_SIZE,
        num_classes=num_classes,
        class_names=list(spec.class_names),
        seed=seed,
        source=source,
        sha256=sha256_file(tmp),
        format=fmt,
        training=training,
    )
    for other in FORMATS:  # one weights file per model: a stale one in the other format would confuse
        if other != fmt and (out_dir / f"{spec.name}.{other}").exists():
            (out_dir / f"{spec.name}.{other}").unlink()
    os.chmod(tmp, 0o644)  # safetensors writes 0600; checkpoints are read by other users (containers)
    os.replace(tmp, path)
    (out_dir / f"{spec.name}.json").write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta


def load_checkpoint(ckpt_dir: Path, name: str) -> tuple[CheckpointMeta, EfficientDet]:
    """Verify and load one checkpoint; returns its metadata and the eval-mode network on CPU."""
    ckpt_dir = Path(ckpt_dir)
    meta = CheckpointMeta.read(ckpt_dir / f"{name}.json")
    pth = ckpt_dir / meta.weights_file
    if meta.name != name:
        raise CheckpointError(f"{ckpt_dir / (name + '.json')} describes {meta.name!r}, not {name!r}")
    if meta.architecture != ARCHITECTURE or meta.image_size != IMAGE_SIZE:
        raise CheckpointError(
            f"{name} is {meta.architecture} at {meta.image_size}px; this service runs {ARCHITECTURE} at {IMAGE_SIZE}px"
        )
    if not pth.exists():
        raise CheckpointError(f"{pth} not found: run `make checkpoints` first")
    actual = sha256_file(pth)
    if actual != meta.sha256:
        raise CheckpointError(
            f"{pth} failed its integrity check: sha256 {actual[:16]}... does not match "
            f"the metadata's {meta.sha256[:16]}...; the file was changed or corrupted"
        )
    state_dict = load_safetensors(pth) if meta.format == "safetensors" else safe_torch_load(pth)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{pth} holds no state_dict")
    if len(meta.class_names) != meta.num_classes:
        raise CheckpointError(f"{name}: {len(meta.class_names)} class names for {meta.num_classes} classes")
    return meta, check_architecture(state_dict, meta.num_classes)
