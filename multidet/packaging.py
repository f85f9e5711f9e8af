"""Packaging: one model archive (MAR) for one optimisation path, and where a source checkout keeps
what goes into it.

A MAR holds the handler file, this package, the three checkpoints (by default the trained ones in
``weights/``), the path's build-time files (an ONNX export, AOT packages, an Inductor cache, made
here by ``Runner.build``) and a ``model-config.yaml``: TorchServe's per-model worker settings plus
the ``handler:`` section, which is ``Settings`` (multidet.config). ``build_mar`` is what
``scripts/create_mar.py`` (``make mar``), the Dockerfiles and ``multidet.server`` all call.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .checkpoints import load_checkpoint
from .config import Settings

# a source checkout's layout (the defaults of the scripts, the tests and the benchmarks)
REPO_ROOT = Path(__file__).resolve().parents[1]
HANDLER = REPO_ROOT / "handlers" / "efficientdet_handler.py"
WEIGHTS = REPO_ROOT / "weights"  # the trained checkpoints
CONFIG = REPO_ROOT / "config.properties"
PHOTOS = REPO_ROOT / "load_tests" / "images"  # sample photos (benchmarks; backgrounds of the synthetic data)


@dataclass(frozen=True)
class MarOptions:
    """What one MAR is built from: the handler's Settings and TorchServe's worker settings."""

    settings: Settings = field(default_factory=Settings)
    checkpoints: Path = WEIGHTS  # read from here, packed under settings.checkpoint_dir
    model_name: str = "all"  # the endpoint: /predictions/<model_name>
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
            "handler": self.settings.to_mapping(),
        }


def build_mar(
    options: MarOptions, export_path: Path, handler: Path = HANDLER, log: Callable[[str], None] = print
) -> Path:
    """Write ``<export_path>/<model_name>.mar``. Checkpoints are verified (sha256, architecture)
    before packing; raises ConfigError / CheckpointError (a user's mistake) or the path's build error."""
    from .runners import RUNNERS, LoadedModel  # the registry imports torch and every path

    settings = options.settings
    if settings.optimization not in RUNNERS or RUNNERS[settings.optimization].benchmark_only:
        from .config import ConfigError

        raise ConfigError(f"no MAR for optimization {settings.optimization!r}")
    models, files = [], []
    for name in settings.models:
        meta, net = load_checkpoint(options.checkpoints, name)
        models.append(LoadedModel(name, tuple(meta.class_names), net))
        files += [options.checkpoints / meta.weights_file, options.checkpoints / f"{name}.json"]

    t0 = time.perf_counter()
    export_path = Path(export_path)
    with tempfile.TemporaryDirectory(prefix="mar-") as tmp:
        extra = Path(tmp) / "extra"
        package = Path(__file__).resolve().parent
        shutil.copytree(package, extra / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (extra / settings.checkpoint_dir).mkdir(parents=True)
        for path in files:
            shutil.copy2(path, extra / settings.checkpoint_dir)
        runner = RUNNERS[settings.optimization]
        kwargs = {"allow_reduced": settings.allow_reduced} if runner.chooses else {}
        for path in dict.fromkeys(runner.build(models, extra / settings.artifact_dir, **kwargs)):
            log(f"built {path.name} for {settings.optimization} ({path.stat().st_size / 1e6:.1f} MB)")
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(options.model_config(), sort_keys=False))
        export_path.mkdir(parents=True, exist_ok=True)
        log(
            f"packing {options.model_name}.mar (optimization={settings.optimization}, "
            f"batchSize={options.batch_size})..."
        )
        cmd = [
            str(Path(sys.executable).with_name("torch-model-archiver")),
            *("--model-name", options.model_name, "--version", "1.0", "--handler", str(handler)),
            *("--extra-files", str(extra), "--config-file", str(config_file)),
            *("--export-path", str(export_path), "--force"),
        ]
        subprocess.run(cmd, check=True)
    mar = export_path / f"{options.model_name}.mar"
    log(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return mar


def build_mar_isolated(options: MarOptions, export_path: Path, handler: Path = HANDLER) -> Path:
    """``build_mar`` in a fresh interpreter: a build step (torch.compile's cache, an AOT compile) then
    sees only its own work, never what the calling process compiled before. Errors come back raised."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(build_mar, options, Path(export_path), Path(handler)).result()
