"""A model's weights, read and verified: effdet's own state_dict for any effdet architecture, from
safetensors or a torch file, with the project's JSON metadata beside it when there is one
(``<stem>.json``: class_names, sha256, training; written by the lab's ``detlab.checkpoints``).

Loading verifies the sha256 first, reads torch files only with ``torch.load(weights_only=True)``, and
checks the architecture (every key and shape) before the weights reach a model.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from effdet import get_efficientdet_config
from effdet.efficientdet import EfficientDet

CLASS_HEAD = "class_net.predict.conv_pw"  # the only layer whose shape depends on num_classes


class CheckpointError(RuntimeError):
    """A checkpoint is missing, tampered with, unsafe or of the wrong architecture."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_config(architecture: str, num_classes: int, image_size: int | None = None):
    """effdet's config of ``architecture`` with ``num_classes``; its own input size unless ``image_size``."""
    try:
        config = get_efficientdet_config(architecture)
    except KeyError:
        raise CheckpointError(f"unknown effdet architecture {architecture!r}") from None
    config.num_classes = num_classes
    if image_size is not None:
        config.image_size = (image_size, image_size)
    return config


def num_anchors(architecture: str) -> int:
    """Anchors per feature-map position (num_scales x aspect ratios): the class layer has this many x classes."""
    config = model_config(architecture, 1)
    return config.num_scales * len(config.aspect_ratios)


def build_network(architecture: str, num_classes: int, image_size: int | None = None) -> EfficientDet:
    """An ``architecture`` network with randomly initialised weights; never touches the network.

    The BiFPN's resampling is built for ``image_size`` (default: the architecture's own); the weights
    do not depend on it, so weights trained at one size load into a network built for another."""
    return EfficientDet(model_config(architecture, num_classes, image_size), pretrained_backbone=False)


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: equal exactly when the tensors are."""
    data = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


# A set's weights with each distinct tensor stored once (what a model archive holds): one safetensors STORE whose
# keys are tensor digests, and per model an INDEX (``<name>.tensors``, JSON) naming the store, its sha256 and, per
# state_dict key, the digest of its tensor. The entry's sha256 covers the index, the index's covers the store.
INDEX_SUFFIX = ".tensors"
_verified: set[tuple] = set()  # (store path, sha256, mtime, size) of the stores checked in this process


def read_indexed(path: Path) -> OrderedDict[str, torch.Tensor]:
    """A model's state_dict from its index and the store it names (verified once per process; only this model's
    tensors are read)."""
    from safetensors import SafetensorError, safe_open

    try:
        index = json.loads(Path(path).read_text())
        store, expected, tensors = Path(path).parent / index["store"], index["store_sha256"], index["tensors"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a weights index: {exc}") from None
    if not store.is_file():
        raise CheckpointError(f"{path} names the tensor store {store.name}, which is missing")
    stat = store.stat()
    key = (str(store.resolve()), expected, stat.st_mtime_ns, stat.st_size)
    if key not in _verified:
        actual = sha256_file(store)
        if actual != expected:
            raise CheckpointError(f"{store} failed its integrity check: sha256 {actual[:16]}... is not {expected[:16]}")
        _verified.add(key)
    try:
        with safe_open(str(store), framework="pt") as f:
            missing = sorted(set(tensors.values()) - set(f.keys()))
            if missing:
                raise CheckpointError(f"{path}: {len(missing)} of its tensors are not in {store.name}")
            return OrderedDict((name, f.get_tensor(digest)) for name, digest in tensors.items())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{store} is not a readable safetensors file: {exc}") from exc


def read_state_dict(path: Path) -> OrderedDict[str, torch.Tensor]:
    """A weights file: safetensors, a weights index (``INDEX_SUFFIX``), or a torch file holding a bare state_dict or
    effdet train.py's dict with ``state_dict_ema`` (preferred) / ``state_dict``. ``module.``/``model.`` prefixes are
    removed."""
    path = Path(path)
    if path.suffix.lower() == INDEX_SUFFIX:
        return read_indexed(path)
    obj = load_safetensors(path) if path.suffix.lower() == ".safetensors" else safe_torch_load(path)
    if isinstance(obj, Mapping) and "state_dict_ema" in obj and obj["state_dict_ema"]:
        obj = obj["state_dict_ema"]
    elif isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no effdet state_dict")
    out = OrderedDict()
    for key, value in obj.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def num_classes_of(state_dict: Mapping[str, torch.Tensor], architecture: str) -> int:
    key = f"{CLASS_HEAD}.weight"
    if key not in state_dict:
        raise CheckpointError(f"not an effdet state_dict: {key} is missing")
    out_channels = state_dict[key].shape[0]
    anchors = num_anchors(architecture)
    if out_channels % anchors:
        raise CheckpointError(f"{key} has {out_channels} outputs, not a multiple of {architecture}'s {anchors} anchors")
    return out_channels // anchors


def safe_torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused by torch.load(weights_only=True): it contains code or objects "
            f"other than tensors ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc


def load_safetensors(path: Path) -> OrderedDict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return OrderedDict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def check_architecture(state_dict: Mapping[str, torch.Tensor], architecture: str, num_classes: int) -> EfficientDet:
    """Build the network and load ``state_dict`` strictly; every key and shape must match."""
    net = build_network(architecture, num_classes)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in expected if k in state_dict and expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"weights do not match {architecture} with {num_classes} classes: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}), {len(wrong)} with other shapes (e.g. {wrong[:2]})"
        )
    net.load_state_dict(state_dict, strict=True)
    return net.eval()


@dataclass
class LoadedModel:
    """One model of the set, loaded: what every optimization runs."""

    name: str
    class_names: tuple[str, ...]
    net: EfficientDet  # eval mode, on CPU as loaded; shared by every optimization, never moved (base.on_device)
    threshold: float | None = None  # the model's own default score threshold (None: the service's)
    # the class ids its training data used and the object kind of each, where its metadata records them
    # (labelled check sets)
    trained_ids: tuple[int, ...] | None = None
    trained_kinds: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def architecture(self) -> str:
        return self.net.config.name


def sidecar(weights: Path) -> dict | None:
    """The project's metadata beside a weights file (``<stem>.json``: class_names, sha256, training), if any."""
    path = Path(weights).with_suffix(".json")
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    return meta if isinstance(meta, dict) and "class_names" in meta else None


def load_entry(entry) -> LoadedModel:
    """One model-set entry (multidet.modelset.ModelEntry) verified and loaded, on CPU in eval mode.

    The weights' sha256 is checked against the entry's, else against the project metadata beside the
    weights (``<stem>.json``) when there is one; torch files are read with ``weights_only=True``; the
    class count and every key and shape are checked against the architecture."""
    weights = Path(entry.weights)
    if not weights.is_file():
        raise CheckpointError(f"weights file {weights} not found")
    meta = sidecar(weights)
    expected = entry.sha256 or (meta or {}).get("sha256")
    if expected:
        actual = sha256_file(weights)
        if actual != expected:
            raise CheckpointError(
                f"{weights} failed its integrity check: sha256 {actual[:16]}... does not match "
                f"the recorded {expected[:16]}...; the file was changed or corrupted"
            )
    if meta and meta.get("architecture") not in (None, entry.architecture):
        raise CheckpointError(f"{weights} was saved as {meta['architecture']}, the entry says {entry.architecture}")
    state_dict = read_state_dict(weights)
    num_classes = num_classes_of(state_dict, entry.architecture)
    try:
        classes = entry.class_names
    except ValueError as exc:
        raise CheckpointError(f"{exc}; the weights have {num_classes} classes") from None
    if len(classes) != num_classes:
        raise CheckpointError(f"{len(classes)} class names, but the weights have {num_classes} classes")
    net = check_architecture(state_dict, entry.architecture, num_classes)
    training = (meta or {}).get("training") or {}
    trained, kinds = training.get("class_ids"), training.get("kinds")
    return LoadedModel(
        name=entry.name,
        class_names=tuple(classes),
        net=net,
        threshold=entry.threshold,
        trained_ids=tuple(int(c) for c in trained) if trained else None,
        trained_kinds=tuple(str(k) for k in kinds) if trained and kinds else None,
    )
