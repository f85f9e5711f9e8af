"""``openvino`` / ``openvino_bf16`` / ``openvino_int8``: each network as OpenVINO IR on its CPU plugin.

Build (``make mar OPT=openvino...``, packed into the MAR): each network is exported to ONNX
(``onnx.export_graph``), converted to OpenVINO IR (``ov.convert_model``, weights kept in f32) and
saved to ``artifacts/openvino/<model>.xml|.bin`` with a stamp naming the checkpoints' sha256 and
the OpenVINO version. ``openvino_int8`` also quantises each network with NNCF post-training
quantisation (mixed preset: symmetric weights, asymmetric activations), calibrated on the first
``CALIBRATION_IMAGES`` images of that model's own training split (``synthetic.render_split``, the
images ``make dataset`` writes), letterboxed and normalised exactly as served.

Load: ``Core.compile_model`` with the latency hint, as many inference threads as PyTorch uses (the
cores), and the precision hint of the path: ``f32`` (exact tier: fp32 arithmetic, up to
reassociation), ``bf16`` (reduced tier, only on CPUs with native bf16: AMX or AVX-512 BF16; refused
with a clear error elsewhere, where OpenVINO would fall back or emulate), and for INT8 ``f32`` for
whatever the quantiser left in float. OpenVINO's model cache (``CACHE_DIR``, by default
``~/.cache/multidet/openvino``, or ``$MULTIDET_CACHE_DIR/openvino``) keeps the compiled blobs, so a
restarted worker skips compilation. A missing or stale IR is rebuilt once at load with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..device import native_bf16
from .base import LoadedModel, RawOutput, Runner, register, weights_stamp
from .onnx import export_graph

log = logging.getLogger(__name__)
CALIBRATION_IMAGES = 32  # per model, from its training split
CALIBRATION_SEED = 0  # the seed `make dataset` uses
OUTPUTS = [f"class_{i}" for i in range(5)] + [f"box_{i}" for i in range(5)]


def cache_dir() -> Path:
    root = os.environ.get("MULTIDET_CACHE_DIR") or Path.home() / ".cache" / "multidet"
    return Path(root) / "openvino"


def calibration_batches(model: str, count: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    """``count`` training images of ``model``, each a normalised [1, 3, 512, 512] float32 array."""
    from ..packaging import PHOTOS
    from ..preprocess import Preprocessor
    from ..synthetic import calibration_images

    pre = Preprocessor()
    return [
        pre.prepare([img], "cpu").tensor.numpy() for img in calibration_images(model, count, CALIBRATION_SEED, PHOTOS)
    ]


class _OpenVinoRunner(Runner):
    devices = ("cpu",)
    separable = True
    auto_candidate = True
    precision: ClassVar[str] = "f32"  # OpenVINO's INFERENCE_PRECISION_HINT
    ir_dir: ClassVar[str] = "openvino"  # under the artifact dir
    quantize: ClassVar[bool] = False

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False
        return super().supports(device)

    @classmethod
    def _stamp(cls, models: Sequence[LoadedModel]) -> dict:
        import openvino as ov

        extra = None
        if cls.quantize:
            import nncf

            extra = {
                "images": CALIBRATION_IMAGES,
                "seed": CALIBRATION_SEED,
                "preset": "mixed",
                "nncf": nncf.__version__,
            }
        return weights_stamp(models, openvino=ov.get_version(), torch=torch.__version__, calibration=extra)

    @classmethod
    def _paths(cls, models: Sequence[LoadedModel], artifact_dir: Path) -> tuple[list[Path], Path]:
        directory = Path(artifact_dir) / cls.ir_dir
        return [directory / f"{m.name}.xml" for m in models], directory / "stamp.json"

    @classmethod
    def _fresh(cls, models: Sequence[LoadedModel], artifact_dir: Path) -> bool:
        xmls, stamp = cls._paths(models, artifact_dir)
        return (
            stamp.exists()
            and json.loads(stamp.read_text()) == cls._stamp(models)
            and all(x.exists() and x.with_suffix(".bin").exists() for x in xmls)
        )

    @classmethod
    def build(cls, models: Sequence[LoadedModel], artifact_dir: Path) -> list[Path]:
        import openvino as ov

        xmls, stamp = cls._paths(models, artifact_dir)
        files = [f for x in xmls for f in (x, x.with_suffix(".bin"))] + [stamp]
        if cls._fresh(models, artifact_dir):  # openvino and openvino_bf16 share one IR: built once
            return files
        # built before for the same weights and versions (another MAR, the tests): copied, not rebuilt
        key = hashlib.sha256(json.dumps(cls._stamp(models), sort_keys=True).encode()).hexdigest()[:24]
        cached = cache_dir() / "builds" / f"{cls.ir_dir}-{key}"
        if all((cached / f.name).exists() for f in files):
            xmls[0].parent.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(cached / f.name, f)
            print(f"{cls.name}: IR for these weights reused from {cached}", flush=True)
            return files
        example = torch.zeros(1, 3, *models[0].net.config.image_size)
        with tempfile.TemporaryDirectory(prefix="onnx-") as tmp:
            for k, (m, xml) in enumerate(zip(models, xmls)):
                t0 = time.perf_counter()
                onnx = export_graph(m.net, example, Path(tmp) / f"{m.name}.onnx")
                model = ov.convert_model(str(onnx))
                if cls.quantize:
                    model = cls._quantize(model, m.name)
                xml.parent.mkdir(parents=True, exist_ok=True)
                ov.save_model(model, str(xml), compress_to_fp16=False)
                print(
                    f"{cls.name}: {m.name} ({k + 1}/{len(models)}) converted"
                    + (" and quantised" if cls.quantize else "")
                    + f" in {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
        stamp.write_text(json.dumps(cls._stamp(models), indent=2) + "\n")
        try:
            cached.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, cached / f.name)
        except OSError as exc:  # no writable cache: the next build converts again
            log.warning("could not keep the built IR in %s: %s", cached, exc)
        return files

    @classmethod
    def _quantize(cls, model, name: str):
        import nncf

        data = calibration_batches(name)
        return nncf.quantize(
            model,
            nncf.Dataset(data),
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=len(data),
        )

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        import openvino as ov

        artifact_dir = self.artifact_dir or Path("artifacts")
        if not self._fresh(self.models, artifact_dir):
            log.warning(
                "OpenVINO IR in %s missing or built from other weights/versions: building now "
                "(build it at MAR build time with `make mar OPT=%s`)",
                Path(artifact_dir) / self.ir_dir,
                self.name,
            )
            self.build(self.models, artifact_dir)
        xmls, _ = self._paths(self.models, artifact_dir)
        core = ov.Core()
        cache = cache_dir()
        try:
            cache.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache)})
        except OSError as exc:  # a read-only home: compile every start, still correct
            log.warning("no OpenVINO model cache (%s): %s", cache, exc)
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "INFERENCE_PRECISION_HINT": self.precision,
        }
        t0 = time.perf_counter()
        self.compiled = [core.compile_model(str(x), "CPU", config) for x in xmls]
        # outputs by name (class_0..4, box_0..4), not by position
        self.order = [[c.output(name) for name in OUTPUTS] for c in self.compiled]
        self.requests = [c.create_infer_request() for c in self.compiled]
        log.info(
            "OpenVINO %s: compiled %d networks in %.1f s (precision %s, threads %d, cache %s)",
            self.name,
            len(self.compiled),
            time.perf_counter() - t0,
            self.compiled[0].get_property("INFERENCE_PRECISION_HINT"),
            self.compiled[0].get_property("INFERENCE_NUM_THREADS"),
            cache,
        )

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        x = np.ascontiguousarray(images.detach().cpu().numpy())
        out = {}
        for k in active:
            results = self.requests[k].infer({0: x})
            # copies: the request's output buffers are reused by its next call
            tensors = [torch.from_numpy(np.array(results[o])).to(self.device) for o in self.order[k]]
            out[k] = (tensors[:5], tensors[5:])
        return out


@register
class OpenVinoRunner(_OpenVinoRunner):
    name = "openvino"
    build_step = "ONNX export + OpenVINO IR conversion of each network"


@register
class OpenVinoBf16Runner(_OpenVinoRunner):
    name = "openvino_bf16"
    tier = "reduced"
    raw_tolerance = None  # judged by mAP on trained weights
    precision = "bf16"
    build_step = "the openvino IR (run with the bf16 precision hint)"
    requires = "native bf16 (AMX or AVX-512 BF16); this CPU would emulate it"

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        return super().supports(device) and native_bf16()


@register
class OpenVinoInt8Runner(_OpenVinoRunner):
    name = "openvino_int8"
    tier = "reduced"
    raw_tolerance = None
    ir_dir = "openvino_int8"
    quantize = True
    build_step = "OpenVINO IR of each network, NNCF INT8 post-training quantisation on its training split"
