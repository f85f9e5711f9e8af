"""``openvino`` / ``openvino_bf16`` / ``openvino_int8``: the set's networks as one OpenVINO IR on its CPU plugin.

Build (``make mar OPT=openvino...``, packed into the MAR): the set's networks as one graph whose shared parts run
once (``sharing.SharedNetwork``: found from the weights; a set that shares nothing is its networks side by side)
are exported to ONNX (``onnx.export_graph``), converted to OpenVINO IR (``ov.convert_model``, weights kept in f32)
and saved to ``artifacts/openvino/set.xml|.bin`` with a stamp naming the checkpoints' sha256 and the OpenVINO
version. ``openvino_int8`` also quantises the graph with NNCF post-training quantisation (mixed preset: symmetric
weights, asymmetric activations), calibrated on the first ``CALIBRATION_IMAGES`` images of each model's own
training split (handed in by the build's caller: ``BuildContext.calibration``; the lab gives the images ``make
dataset`` writes), letterboxed and normalised exactly as served, with NNCF's overflow fix on every layer
(``OVERFLOW_FIX``): weights use 7 of their 8 bits, so a u8 x s8 product pair fits the 16-bit sums of the CPUs
without VNNI (AVX2-only, e.g. AMD EPYC Zen 2/3), whose ``vpmaddubsw`` kernels saturate otherwise. The IR
therefore means the same on every CPU kind it is served on, whichever built it (measured, docs/benchmarks.md
section 9: without the fix the vehicles model's mAP@0.5 was 3 points lower on AVX2 kernels than on VNNI ones,
8 on the tests' images; with it the two kinds agree within 0.4 points).

Load: ``Core.compile_model`` with the latency hint, as many inference threads as PyTorch uses (the
cores), and the precision hint of the path: ``f32`` (exact tier: fp32 arithmetic, up to
reassociation), ``bf16`` (reduced tier, only on CPUs with native bf16: AMX or AVX-512 BF16; refused
with a clear error elsewhere, where OpenVINO would fall back or emulate), and for INT8 ``f32`` for
whatever the quantiser left in float. OpenVINO's model cache (``CACHE_DIR``, by default
``~/.cache/multidet/openvino``, or ``$MULTIDET_CACHE_DIR/openvino``) keeps the compiled blobs, so a
restarted worker skips compilation; the IR itself is kept in the build cache (``artifacts.reuse_or_build``),
so another archive of the same weights and versions copies it. A missing or stale IR is rebuilt once at
load with a warning.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..artifacts import Artifact, ensure, reuse_or_build
from ..artifacts import cache_dir as artifacts_cache
from ..device import native_bf16
from ..preprocess import Preprocessor
from ..sharing import split_flat
from .base import BuildContext, LoadedModel, Optimization, RawOutput, register, weights_stamp
from .onnx import export_graph, output_names, set_graph

log = logging.getLogger(__name__)
CALIBRATION_IMAGES = 32  # per model, from its training split
CALIBRATION_SEED = 0  # the seed `make dataset` uses
SET_IR = "set.xml"  # the set's networks as one graph, what the models share once (multidet.sharing)
# NNCF's OverflowFix: "enable" (7-bit weights in every layer) makes INT8 answers independent of VNNI; NNCF's
# default, "first_layer", leaves the other layers to saturate on AVX2-only CPUs
OVERFLOW_FIX = "enable"


def to_ir(
    module: torch.nn.Module, example: torch.Tensor, names: list[str] | None, xml: Path, calibration: list | None = None
) -> Path:
    """``module`` (one network, or a set's graph) exported to ONNX, converted to OpenVINO IR (weights kept in f32)
    and, given ``calibration`` batches, quantised to INT8 by NNCF (mixed preset, ``OVERFLOW_FIX``); saved at
    ``xml`` (+ ``.bin``)."""
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="onnx-") as tmp:
        model = ov.convert_model(str(export_graph(module, example, Path(tmp) / "graph.onnx", names)))
    if calibration is not None:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        model = nncf.quantize(
            model,
            nncf.Dataset(calibration),
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=len(calibration),
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix(OVERFLOW_FIX)),
        )
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


def cache_dir() -> Path:
    return artifacts_cache() / "openvino"


def calibration_batches(model: LoadedModel, context: BuildContext, count: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    """``count`` training images of ``model`` (``context.calibration``), each a normalised [1, 3, H, W] float32
    array at its architecture's input size, as served. The INT8 build refuses without them: calibration on
    other images would quantise for other statistics than the ones served."""
    if context.calibration is None:
        raise RuntimeError(
            "INT8 calibration needs the model's training images: build the IR with a BuildContext that gives them "
            "(make mar; detlab.build.context)"
        )
    pre = Preprocessor(model.net.config)
    return [pre.prepare([img], "cpu").tensor.numpy() for img in context.calibration(model, count, CALIBRATION_SEED)]


class _OpenVino(Optimization):
    devices = ("cpu",)
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
                "overflow_fix": OVERFLOW_FIX,
                "nncf": nncf.__version__,
            }
        # graph 2: the set as one IR, shared parts once
        return weights_stamp(models, openvino=ov.get_version(), torch=torch.__version__, calibration=extra, graph=2)

    @classmethod
    def _xml(cls, artifact_dir: Path) -> Path:
        return Path(artifact_dir) / cls.ir_dir / SET_IR

    @classmethod
    def _artifact(cls, models: Sequence[LoadedModel], artifact_dir: Path) -> Artifact:
        xml = cls._xml(artifact_dir)
        return Artifact([xml, xml.with_suffix(".bin")], xml.parent / "stamp.json", cls._stamp(models))

    @classmethod
    def build(
        cls, models: Sequence[LoadedModel], artifact_dir: Path, context: BuildContext | None = None
    ) -> list[Path]:
        context = context or BuildContext()
        # openvino and openvino_bf16 share one IR (fresh: built once); another archive of the same weights and
        # versions copies it from the build cache
        return reuse_or_build(
            cls._artifact(models, artifact_dir), lambda: cls._convert(models, artifact_dir, context), context.log
        )

    @classmethod
    def _convert(cls, models: Sequence[LoadedModel], artifact_dir: Path, context: BuildContext) -> None:
        t0 = time.perf_counter()
        network, example, names = set_graph(models)  # what the models share, once in the graph
        # INT8: every model's own calibration images, through the one graph
        calibration = [b for m in models for b in calibration_batches(m, context)] if cls.quantize else None
        to_ir(network, example, names, cls._xml(artifact_dir), calibration)
        plan = network.plan
        context.log(
            f"{cls.name}: the set's {len(models)} networks as one IR ({plan.computed} of {plan.total} segments: "
            f"shared parts once)" + (" quantised" if cls.quantize else "") + f" in {time.perf_counter() - t0:.0f} s"
        )

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        import openvino as ov

        artifact_dir = self.artifacts()
        ensure(
            self._artifact(self.models, artifact_dir),
            lambda: self.build(self.models, artifact_dir, BuildContext(log=log.info)),
            self.name,
        )
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
        self.compiled = core.compile_model(str(self._xml(artifact_dir)), "CPU", config)
        self.levels = self.models[0].net.config.num_levels
        # outputs by name (m<k>_class_<l>, m<k>_box_<l>), not by position
        self.order = [self.compiled.output(name) for name in output_names(len(self.models), self.levels)]
        self.request = self.compiled.create_infer_request()
        log.info(
            "OpenVINO %s: compiled the set's graph of %d networks in %.1f s (precision %s, threads %d, cache %s)",
            self.name,
            len(self.models),
            time.perf_counter() - t0,
            self.compiled.get_property("INFERENCE_PRECISION_HINT"),
            self.compiled.get_property("INFERENCE_NUM_THREADS"),
            cache,
        )

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        results = self.request.infer({0: np.ascontiguousarray(images.detach().cpu().numpy())})
        # copies: the request's output buffers are reused by its next call
        tensors = [torch.from_numpy(np.array(results[o])).to(self.device) for o in self.order]
        return split_flat(tensors, self.levels, active)


@register
class OpenVino(_OpenVino):
    name = "openvino"
    build_step = "ONNX export + OpenVINO IR conversion of the set's graph"


@register
class OpenVinoBf16(_OpenVino):
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
class OpenVinoInt8(_OpenVino):
    name = "openvino_int8"
    tier = "reduced"
    raw_tolerance = None
    ir_dir = "openvino_int8"
    quantize = True
    build_step = "OpenVINO IR of the set's graph, NNCF INT8 post-training quantisation on each model's training split"
