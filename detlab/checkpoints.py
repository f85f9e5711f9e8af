"""Checkpoints the lab makes: seeded random weights (``make checkpoints``), effdet's pretrained ones, and
trained ones saved with the project's JSON metadata beside them. The serving runtime reads them with
``multidet.weights``.

    <dir>/<name>.safetensors   trained (the shipped ones: weights/), or a user's (safetensors: tensors only)
    <dir>/<name>.pth           seeded random (make checkpoints), or a user's (bare state_dict or train.py's dict)
    <dir>/<name>.json          the project's metadata: {name, architecture, image_size, num_classes,
                               class_names, seed, source, sha256, format, training}

``format`` names the weights file (``pth`` or ``safetensors``); ``training`` records how a trained
checkpoint was made (dataset, seed, steps, val mAP).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from effdet.efficientdet import EfficientDet

from multidet.modelset import MODELS_FILE, ModelEntry, ModelSet
from multidet.preprocess import Preprocessor
from multidet.weights import (
    CheckpointError,
    build_network,
    check_architecture,
    load_entry,
    num_classes_of,
    sha256_file,
)

FORMATS = ("pth", "safetensors")


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


def generate_state_dict(
    architecture: str,
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
    net = build_network(architecture, num_classes)
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


def pretrained_state_dict(architecture: str, num_classes: int, seed: int) -> OrderedDict[str, torch.Tensor]:
    """effdet's pretrained COCO weights of ``architecture``; for other class counts the class head is
    re-initialised. Needs the network: fails with a clear CheckpointError offline."""
    from effdet import create_model

    try:
        net = create_model(architecture, bench_task="", num_classes=90, pretrained=True)
    except Exception as exc:  # urllib/hub errors vary by version; all mean the same to the user
        raise CheckpointError(
            f"could not download effdet's pretrained {architecture} weights ({type(exc).__name__}: {exc}); "
            "this machine may be offline. Run without --pretrained to generate seeded checkpoints, "
            "or pass --from PATH with a checkpoint you have."
        ) from exc
    if num_classes != 90:
        torch.manual_seed(seed)
        net.reset_head(num_classes=num_classes)
    return net.state_dict()


def save_checkpoint(
    out_dir: Path,
    name: str,
    architecture: str,
    class_names: Sequence[str],
    state_dict: Mapping[str, torch.Tensor],
    *,
    seed: int | None,
    source: str,
    fmt: str = "pth",
    training: dict | None = None,
) -> CheckpointMeta:
    """Write ``<out_dir>/<name>.<fmt>`` and its metadata ``<name>.json`` (checked before writing)."""
    num_classes = num_classes_of(state_dict, architecture)
    if num_classes != len(class_names):
        raise CheckpointError(f"{name} has {len(class_names)} class names, the weights have {num_classes} classes")
    if fmt not in FORMATS:
        raise CheckpointError(f"format must be one of {FORMATS}, got {fmt!r}")
    net = check_architecture(state_dict, architecture, num_classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = out_dir / f"{name}.{fmt}", out_dir / f".{name}.{fmt}.tmp"
    tensors = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state_dict.items())
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata={"name": name, "architecture": architecture})
    else:
        torch.save(tensors, tmp)
    meta = CheckpointMeta(
        name=name,
        architecture=architecture,
        image_size=net.config.image_size[0],
        num_classes=num_classes,
        class_names=list(class_names),
        seed=seed,
        source=source,
        sha256=sha256_file(tmp),
        format=fmt,
        training=training,
    )
    for other in FORMATS:  # one weights file per model: a stale one in the other format would confuse
        if other != fmt and (out_dir / f"{name}.{other}").exists():
            (out_dir / f"{name}.{other}").unlink()
    os.chmod(tmp, 0o644)  # safetensors writes 0600; checkpoints are read by other users (containers)
    os.replace(tmp, path)
    (out_dir / f"{name}.json").write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta


def entry_of_checkpoint(ckpt_dir: Path, name: str, meta: CheckpointMeta | None = None):
    """The model-set entry of a project checkpoint folder's ``<name>.json`` (``meta`` when already read) + weights."""
    ckpt_dir = Path(ckpt_dir)
    meta = meta or CheckpointMeta.read(ckpt_dir / f"{name}.json")
    if meta.name != name:
        raise CheckpointError(f"{ckpt_dir / (name + '.json')} describes {meta.name!r}, not {name!r}")
    return ModelEntry(name=name, architecture=meta.architecture, weights=(ckpt_dir / meta.weights_file).resolve())


def load_checkpoint(ckpt_dir: Path, name: str) -> tuple[CheckpointMeta, EfficientDet]:
    """Verify and load one project checkpoint of a folder; returns its metadata and the eval-mode network."""
    ckpt_dir = Path(ckpt_dir)
    meta = CheckpointMeta.read(ckpt_dir / f"{name}.json")
    if len(meta.class_names) != meta.num_classes:
        raise CheckpointError(f"{name}: {len(meta.class_names)} class names for {meta.num_classes} classes")
    return meta, load_entry(entry_of_checkpoint(ckpt_dir, name, meta)).net


def graft(base: Mapping[str, torch.Tensor], donor: Mapping[str, torch.Tensor], own: Sequence[str]) -> OrderedDict:
    """``base``'s tensors, those under the key prefixes ``own`` (e.g. ``("class_net.",)``) taken from ``donor`` (same
    architecture, any class count): a model that shares the rest of ``base`` bit for bit, as a fine-tune with
    those parts frozen would."""
    return OrderedDict((k, donor[k] if k.startswith(tuple(own)) else v) for k, v in base.items())


def perturbed(state: Mapping[str, torch.Tensor], own: Sequence[str], factor: float) -> OrderedDict:
    """``state`` with its float tensors under the prefixes ``own`` scaled by ``factor``: a model of its own in those
    parts (other content, nearly the same answers: what a set of distinct models costs to run)."""
    return OrderedDict(
        (k, v * factor if k.startswith(tuple(own)) and v.is_floating_point() else v) for k, v in state.items()
    )


def calibration_batch(photos: Sequence[bytes], architecture: str) -> torch.Tensor:
    """Photos letterboxed as for inference at ``architecture``'s input size, plus their mirror images:
    what a generated model's BatchNorm statistics are set from."""
    if not photos:
        raise CheckpointError("no calibration photos")
    batch = Preprocessor(architecture).prepare_bytes(list(photos), "cpu", 10**9).tensor
    return torch.cat([batch, batch.flip(-1)])


def generate_model_set(
    specs: Sequence[tuple[str, str, Sequence[str]]],
    out_dir: Path,
    photos: Sequence[bytes],
    seed: int = 0,
    thresholds: Mapping[str, float] | None = None,
    force: bool = False,
    progress=None,
):
    """Seeded random checkpoints for ``specs`` ((name, architecture, class names) each; model k gets
    ``seed + k``) in ``out_dir``, and ``out_dir/models.yaml`` listing them: a model set that behaves like
    trained weights arithmetically (BatchNorm calibrated on ``photos``) but detects nothing real.
    Up-to-date checkpoints (same seed, architecture, classes; verified) are kept. Returns the ModelSet."""
    out_dir = Path(out_dir)
    calibration: dict[str, torch.Tensor] = {}
    entries = []
    for k, (name, architecture, class_names) in enumerate(specs):
        entry = ModelEntry(
            name=name,
            architecture=architecture,
            weights=(out_dir / f"{name}.pth").resolve(),
            threshold=(thresholds or {}).get(name),
        )
        prefix = f"[{k + 1}/{len(specs)}] {name}"
        if not force and _up_to_date(out_dir, name, architecture, list(class_names), seed + k):
            if progress:
                progress(f"{prefix}: up to date ({architecture}, seed {seed + k})")
        else:
            if progress:
                progress(f"{prefix}: building {architecture} with {len(class_names)} classes (seed {seed + k})...")
            if architecture not in calibration:
                calibration[architecture] = calibration_batch(photos, architecture)
            state = generate_state_dict(architecture, len(class_names), seed + k, calibration[architecture])
            meta = save_checkpoint(out_dir, name, architecture, class_names, state, seed=seed + k, source="generated")
            if progress:
                size = entry.weights.stat().st_size / 1e6
                progress(f"{prefix}: wrote {entry.weights} ({size:.1f} MB, sha256 {meta.sha256[:16]}...)")
        entries.append(entry)
    model_set = ModelSet(tuple(entries), out_dir / MODELS_FILE)
    model_set.write(out_dir / MODELS_FILE)
    return model_set


def _up_to_date(out_dir: Path, name: str, architecture: str, class_names: list[str], seed: int) -> bool:
    try:
        meta = CheckpointMeta.read(Path(out_dir) / f"{name}.json")
        if (meta.seed, meta.source, meta.architecture, meta.class_names) != (
            seed,
            "generated",
            architecture,
            class_names,
        ):
            return False
        load_entry(entry_of_checkpoint(out_dir, name, meta))  # verifies sha256 and architecture
        return True
    except CheckpointError:
        return False
