"""``aot_inductor``: the networks compiled ahead of time by AOTInductor, loaded in milliseconds.

``torch.compile`` compiles in the worker (about two minutes cold on the 2-core development CPU, ~50 s
with the Inductor cache packed into the MAR, since Dynamo still traces at every start). This optimization
moves all of it to the build: ``make mar OPT=aot_inductor`` exports each network with
``torch.export`` (batch dimension dynamic, 1..MAX_BATCH, so TorchServe batching needs no recompile)
and compiles it with ``torch._inductor.aoti_compile_and_package`` into ``artifacts/aoti_<model>.pt2``
plus a JSON stamp (weights sha256, torch version, device type). A worker only loads the packages.
The packages hold machine code for the device they were built on: a stale or missing package
(other weights, torch or device) is rebuilt once at load, with a warning, never per request.

Each package is checked against the eager network right after compiling (``verify``) and refused
if it differs: with torch 2.14 on CPU, AOTInductor produced packages whose outputs were off by
thousands when the example batch was zeros or noise (a photo-like example compiles correctly),
and for the fused ``grouped`` super-model. The three networks therefore stay separate here.
Post-processing stays eager and shared, as for every optimization.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..artifacts import Artifact, ensure
from ..preprocess import Preprocessor
from .base import BuildContext, LoadedModel, RawOutput, on_device, register, weights_stamp
from .baseline import Baseline

log = logging.getLogger(__name__)
MAX_BATCH = 64
STAMP_FILE = "aoti.json"


def package_path(artifact_dir: Path, model: LoadedModel) -> Path:
    return Path(artifact_dir) / f"aoti_{model.name}.pt2"


def _stamp(models: Sequence[LoadedModel], device: torch.device) -> dict:
    return weights_stamp(models, torch=torch.__version__, device=device.type, max_batch=MAX_BATCH)


def synthetic_photo(size: int = 640) -> Image.Image:
    """A deterministic, photo-like image (smooth gradients and shapes; no file needed)."""
    y, x = np.mgrid[0 : size * 3 // 4, 0:size].astype(np.float32)
    r = 127 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)
    g = 127 + 100 * np.cos((x + y) / 51.0)
    b = 127 + 100 * np.sin(np.hypot(x - size / 2, y - size / 3) / 29.0)
    return Image.fromarray(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8), "RGB")


def example_batch(device: torch.device, architecture: str) -> torch.Tensor:
    """Two different normalised photo-like images. Two, because export specialises a batch of 1 to
    a constant; photo-like, because AOTInductor (torch 2.14, CPU) produced wrong packages when
    the example batch was all zeros or random noise (found here; every package is verified)."""
    pre = Preprocessor(architecture)
    return pre.prepare([synthetic_photo(size) for size in (640, 480)], device).tensor


def verify(package, net: torch.nn.Module, example: torch.Tensor, tolerance: float = 5e-3) -> float:
    """The package's raw outputs against the eager network's on the example batch and on its second
    image alone (another batch size): the largest difference relative to the output's magnitude.
    Inductor's reassociated kernels give ~1e-5..3e-4; a miscompiled package is off by orders more."""
    with torch.inference_mode():
        ref_cls, ref_box = net(example)
        got_cls, got_box = package(example)
        one_cls, one_box = package(example[1:])
    pairs = list(zip(ref_cls + ref_box, list(got_cls) + list(got_box)))
    pairs += [(a[1:], b) for a, b in zip(ref_cls + ref_box, list(one_cls) + list(one_box))]
    diff = max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-6)) for a, b in pairs)
    if not diff <= tolerance:
        raise RuntimeError(
            f"AOTInductor package differs from the eager network by {diff:.3g} relative (> {tolerance}); "
            "refusing it (a compiler bug: try another torch version, or OPT=compile)"
        )
    return diff


def compile_packages(
    models: Sequence[LoadedModel], artifact_dir: Path, device: torch.device, say: Callable[[str], None] = log.info
) -> list[Path]:
    artifact_dir = Path(artifact_dir)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    (artifact_dir / STAMP_FILE).unlink(missing_ok=True)
    example = example_batch(device, models[0].architecture)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    written = []
    for k, model in enumerate(models):
        t0 = time.perf_counter()
        say(f"AOTInductor: compiling {model.name} ({k + 1}/{len(models)}) for {device.type} ...")
        net = on_device(model.net, device).eval()
        program = torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}})
        path = Path(
            torch._inductor.aoti_compile_and_package(program, package_path=str(package_path(artifact_dir, model)))
        )
        diff = verify(torch._inductor.aoti_load_package(str(path)), net, example)
        written.append(path)
        say(
            f"  {path.name}: {time.perf_counter() - t0:.0f} s, {path.stat().st_size / 1e6:.1f} MB, "
            f"max relative diff vs eager {diff:.1e}"
        )
    stamp = Artifact(written, artifact_dir / STAMP_FILE, _stamp(models, device)).write_stamp()
    return written + [stamp]


@register
class AotInductor(Baseline):
    name = "aot_inductor"
    auto_candidate = False  # its packages are compiled at MAR build (minutes)
    devices = ("cpu", "cuda")
    build_step = "AOTInductor compile of each network, each checked against eager"
    build_minutes = 2.0

    @classmethod
    def build(
        cls, models: Sequence[LoadedModel], artifact_dir: Path, context: BuildContext | None = None
    ) -> list[Path]:
        return compile_packages(models, artifact_dir, torch.device("cpu"), (context or BuildContext()).log)

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        directory = self.artifacts()
        artifact = Artifact(
            [package_path(directory, m) for m in self.models], directory / STAMP_FILE, _stamp(self.models, self.device)
        )
        ensure(artifact, lambda: compile_packages(self.models, directory, self.device), self.name, "compiling")
        t0 = time.perf_counter()
        self.nets = [torch._inductor.aoti_load_package(str(package_path(directory, m))) for m in self.models]
        log.info("loaded %d AOTInductor packages in %.2f s", len(self.nets), time.perf_counter() - t0)

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        return self.forward_each(images, active)  # one program per network: shared parts run in each
