"""Packaging: one model archive (MAR) for one optimization. Where the handler, the model set
and the calibration photos are is the caller's to say (``MarOptions``): the package knows no checkout.

A MAR holds the handler file, the runtime package, the model set (a ``models.yaml`` and the weights under
``models/``: each distinct tensor once in one store, an index per model, with its classes and sha256 written out,
so every load verifies them;
by default the repository's ``models.yaml``: the trained weights in ``weights/``), the optimization's
build-time files (an ONNX export, AOT packages, an Inductor cache, made here by ``Optimization.build``)
and a ``model-config.yaml``: TorchServe's per-model worker settings plus the ``handler:`` section,
which is ``Settings`` (multidet.config). ``build_mar`` is what ``scripts/create_mar.py`` (``make mar``),
the Dockerfiles and ``detlab.server`` all call.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml

import multidet
from multidet.config import ConfigError, Settings
from multidet.modelset import MODELS_FILE, ModelSet, load_models, pinned, read_model_set
from multidet.weights import INDEX_SUFFIX, LoadedModel, sha256_file, sidecar, tensor_digest


@dataclass(frozen=True)
class MarOptions:
    """What one MAR is built from: the handler's Settings and TorchServe's worker settings."""

    settings: Settings = field(default_factory=Settings)
    model_set: Path | None = None  # the models file (or a folder with models.yaml); settings.models selects
    handler: Path | None = None  # the TorchServe handler file (handlers/efficientdet_handler.py)
    calibration_photos: Path | None = None  # INT8 calibration backgrounds
    model_name: str = "all"  # the endpoint: /predictions/<model_name>
    version: str = "1.0"  # the model version TorchServe registers (make update registers the next one)
    archive_name: str | None = None  # the .mar file's stem (default: model_name)
    workers: int = 1
    batch_size: int = 1
    max_batch_delay: int = 50  # ms TorchServe waits to fill a batch
    response_timeout: int = 120  # s per inference before the worker is reset
    startup_timeout: int = 600  # s for load + warm-up
    device_ids: tuple[int, ...] = ()  # GPUs this model's workers may use (TorchServe deviceIds)

    @classmethod
    def of(cls, **values) -> MarOptions:
        """Settings fields and MarOptions fields in one call, e.g. ``MarOptions.of(optimization="onnxruntime",
        batch_size=4)``."""
        own = {f.name for f in fields(cls)}
        settings = {k: v for k, v in values.items() if k not in own}
        return cls(settings=Settings(**settings), **{k: v for k, v in values.items() if k in own})

    def model_config(self) -> dict:
        """The MAR's model-config.yaml."""
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay,
            "responseTimeout": self.response_timeout,
            "startupTimeout": self.startup_timeout,
            **({"deviceIds": list(self.device_ids)} if self.device_ids else {}),
            # the archive holds exactly the selected models: its handler loads all of its own set
            "handler": {**self.settings.to_mapping(), "model_set": MODELS_FILE, "models": []},
        }


def build_mar(options: MarOptions, export_path: Path, log: Callable[[str], None] = print) -> Path:
    """Write ``<export_path>/<model_name>.mar``. Every model of the set is checked before packing (the
    file's form, each weights file: integrity, no code, architecture, class count); raises ConfigError
    (a user's mistake, naming the entry) or the optimization's build error."""
    from multidet.optimizations import OPTIMIZATIONS, SERVABLE, build_optimization  # imports torch: only here

    from . import build

    settings = options.settings
    if settings.optimization not in SERVABLE:
        raise ConfigError(f"no MAR for optimization {settings.optimization!r}")
    if options.model_set is None or options.handler is None:
        raise ConfigError("MarOptions needs model_set and handler (the command line resolves them)")
    handler = Path(options.handler)
    model_set = read_model_set(options.model_set).select(settings.models or None)
    models = load_models(model_set)
    packed = pinned(model_set, models)
    log(f"model set {model_set.source}: " + ", ".join(f"{m.name} ({m.architecture}, {m.num_classes})" for m in models))

    t0 = time.perf_counter()
    export_path = Path(export_path)
    with tempfile.TemporaryDirectory(prefix="mar-") as tmp:
        extra = Path(tmp) / "extra"
        package = Path(multidet.__file__).resolve().parent  # the runtime only: the lab stays out
        shutil.copytree(package, extra / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        write_model_set(packed, models, extra)
        context = build.context(settings.allow_reduced, options.calibration_photos, log)
        opt = OPTIMIZATIONS[settings.optimization]
        if opt.build_step:
            took = f" (about {opt.build_minutes:.0f} min on 2 cores)" if opt.build_minutes >= 1 else ""
            log(f"{settings.optimization}: {opt.build_step}{took}")
        for path in dict.fromkeys(
            build_optimization(settings.optimization, models, extra / settings.artifact_dir, context)
        ):
            log(f"built {path.name} for {settings.optimization} ({path.stat().st_size / 1e6:.1f} MB)")
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(options.model_config(), sort_keys=False))
        export_path.mkdir(parents=True, exist_ok=True)
        archive = options.archive_name or options.model_name
        log(
            f"packing {archive}.mar ({options.model_name} version {options.version}, "
            f"optimization={settings.optimization}, batchSize={options.batch_size})..."
        )
        packed_dir = Path(tmp) / "packed"  # archived beside, then moved: a live store's files stay whole
        cmd = [
            str(Path(sys.executable).with_name("torch-model-archiver")),
            *("--model-name", options.model_name, "--version", options.version, "--handler", str(handler)),
            *("--extra-files", str(extra), "--config-file", str(config_file)),
            *("--export-path", str(packed_dir), "--force"),
        ]
        packed_dir.mkdir()
        subprocess.run(cmd, check=True)
        mar = export_path / f"{archive}.mar"
        shutil.move(packed_dir / f"{options.model_name}.mar", mar)
    log(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return mar


def write_model_set(model_set: ModelSet, models: Sequence[LoadedModel], folder: Path) -> Path:
    """The set's weights under ``folder/models/``, each distinct tensor once: one tensor store and an index per
    model (``multidet.weights.read_indexed``; a part the models share is stored once), the project metadata
    beside each index, and ``folder/models.yaml`` pointing at the indexes with their sha256."""
    from dataclasses import replace

    target = Path(folder) / "models"
    indexes = write_indexed({m.name: m.net.state_dict() for m in models}, target)
    entries = []
    for e in model_set.entries:
        index = indexes[e.name]
        if sidecar(e.weights) is not None:
            shutil.copy2(Path(e.weights).with_suffix(".json"), index.with_suffix(".json"))
        entries.append(replace(e, weights=index.resolve(), sha256=sha256_file(index)))
    return ModelSet(tuple(entries)).write(Path(folder) / MODELS_FILE)


def write_indexed(states: dict[str, dict[str, torch.Tensor]], folder: Path, store_name: str = "tensors.safetensors"):
    """``states`` (model name -> state_dict) as one store holding each distinct tensor once and an index per model
    (``<name>.tensors``) in ``folder``; returns {name: index path}. What ``multidet.weights.read_indexed`` reads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    store: dict[str, torch.Tensor] = {}
    indexes = {}
    for name, state in states.items():
        digests = {}
        for key, tensor in state.items():
            digest = tensor_digest(tensor)
            store.setdefault(digest, tensor.detach().cpu().contiguous())
            digests[key] = digest
        indexes[name] = digests
    save_file(store, str(folder / store_name))
    store_sha = sha256_file(folder / store_name)
    out = {}
    for name, digests in indexes.items():
        out[name] = folder / f"{name}{INDEX_SUFFIX}"
        out[name].write_text(json.dumps({"store": store_name, "store_sha256": store_sha, "tensors": digests}) + "\n")
    return out


def build_mar_isolated(options: MarOptions, export_path: Path) -> Path:
    """``build_mar`` in a fresh interpreter: a build step (torch.compile's cache, an AOT compile) then
    sees only its own work, never what the calling process compiled before. Errors come back raised."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(build_mar, options, Path(export_path)).result()
