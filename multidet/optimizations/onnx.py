"""``onnxruntime`` / ``onnxruntime_stacked`` / ``onnxruntime_per_model``: the networks as ONNX, run by ONNX Runtime.

Three forms, all offered because which is faster depends on the CPU and the set (``auto`` times them at load):
``onnxruntime`` runs the set as ONE graph, ``sharing.SharedNetwork``: what the models share (found from their
weights, ``multidet.sharing``) once, their own parts side by side; ``onnxruntime_stacked`` the same with the
models' own parts stacked (``grouped.StackedShared``: a third of the kernel launches for three models that share
nothing, wider convolutions); ``onnxruntime_per_model`` runs one plain graph per network, one session each (what
a user running the models on ONNX Runtime alone would do). Measured on a 2-core Xeon (2026-12-07): eight models
sharing all but their class nets 108 ms side by side against 134 ms stacked; four sharing nothing 235 against
247 (and 239 for the old grouped super-model).

The export is a build step: ``make mar OPT=onnxruntime`` writes ``artifacts/set.onnx`` (``grouped.onnx``
stacked, ``onnx/<model>.onnx`` per model) plus a JSON stamp naming the checkpoints' sha256 it was exported
from, and packs them into the MAR. At load the stamp is checked; a missing or stale file is
re-exported once at load (a warning in the log), never per request. Sessions use graph optimization
level "all" and as many intra-op threads as PyTorch (the cores); ONNX Runtime's CUDA provider is
used on a CUDA device when onnxruntime-gpu is installed. Post-processing (top-k/NMS) stays in
PyTorch, shared with every other path.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..artifacts import Artifact, ensure, reuse_or_build
from ..sharing import Plan, SharedNetwork, split_flat
from .base import BuildContext, LoadedModel, Optimization, RawOutput, architecture_groups, register, weights_stamp
from .grouped import StackedShared

log = logging.getLogger(__name__)
SET_FILE = {False: "set.onnx", True: "grouped.onnx"}  # the set's graph: own parts side by side / stacked
PER_MODEL_DIR = "onnx"
OPSET = 17


def _stamp(models: Sequence[LoadedModel]) -> dict:
    # graph: the one graph's layout (v2: one class-head conv per model, no zero padding; v3: shared parts once,
    # outputs per model)
    return weights_stamp(models, opset=OPSET, torch=torch.__version__, graph=3)


def output_names(models: int = 1, levels: int = 5) -> list[str]:
    """class_0..4 then box_0..4 (effdet's level order) for one network; m<k>_class_<l>, m<k>_box_<l> per model for
    the set's graph (``sharing.split_flat``'s order)."""
    one = [f"class_{i}" for i in range(levels)] + [f"box_{i}" for i in range(levels)]
    return one if models == 1 else [f"m{k}_{name}" for k in range(models) for name in one]


def private(models: Sequence[LoadedModel]) -> list[torch.nn.Module]:
    """Each network as a copy of its own, no tensor shared with another (what ``export_graph`` needs)."""
    return [copy.deepcopy(m.net).eval() for m in models]


def export_graph(module: torch.nn.Module, example: torch.Tensor, path: Path, names: list[str] | None = None) -> Path:
    """One network (or the set's graph) to ONNX: opset 17, dynamic batch, outputs ``names`` (``output_names``).

    Give it copies (``private``): the TorchScript-based exporter folds BatchNorm into the parameters it is given,
    once per use, so a tensor that two layers use (``sharing.hold_once``) came out folded twice, in the graph and
    in the networks (measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch 2.14 marks the TorchScript-based exporter deprecated in favour of the torch.export
        # one; for this static graph it is the fast, dependency-free choice (opset 17, dynamic batch)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=names or output_names(),
            dynamic_axes={"images": {0: "batch"}},
        )
    return path


def set_artifact(models: Sequence[LoadedModel], directory: Path, stacked: bool) -> Artifact:
    path = Path(directory) / SET_FILE[stacked]
    return Artifact([path], path.with_suffix(".json"), _stamp(models))


def set_graph(models: Sequence[LoadedModel], stacked: bool = False) -> tuple[torch.nn.Module, torch.Tensor, list[str]]:
    """The set as one module to export, what the models share once: their own parts side by side
    (``SharedNetwork``) or stacked (``StackedShared``); with an example input and its output names."""
    config = models[0].net.config
    nets = private(models)  # shared parts are found by content, not by tensor identity
    network = StackedShared(nets) if stacked else SharedNetwork(nets)
    return network, torch.zeros(1, 3, *config.image_size), output_names(len(models), config.num_levels)


def export_onnx(models: Sequence[LoadedModel], path: Path, stacked: bool = False) -> Path:
    """The set's graph (``set_graph``) as ONNX (``set_files`` stamps it)."""
    with torch.no_grad():
        network, example, names = set_graph(models, stacked)
        return export_graph(network, example, path, names)


def per_model_paths(models: Sequence[LoadedModel], directory: Path) -> list[Path]:
    return [Path(directory) / PER_MODEL_DIR / f"{m.name}.onnx" for m in models]


def per_model_artifact(models: Sequence[LoadedModel], directory: Path) -> Artifact:
    return Artifact(per_model_paths(models, directory), Path(directory) / PER_MODEL_DIR / "stamp.json", _stamp(models))


def export_per_model(models: Sequence[LoadedModel], directory: Path) -> list[Path]:
    """Each network as its own graph (``<directory>/onnx/<model>.onnx``; ``per_model_files`` stamps them)."""
    example = torch.zeros(1, 3, *models[0].net.config.image_size)
    return [export_graph(net, example, path) for net, path in zip(private(models), per_model_paths(models, directory))]


def set_files(models: Sequence[LoadedModel], directory: Path, stacked: bool = False, say=log.info) -> list[Path]:
    """The set graph's export and stamp in ``directory``: from the build cache when exported before."""
    path = Path(directory) / SET_FILE[stacked]
    return reuse_or_build(set_artifact(models, directory, stacked), lambda: export_onnx(models, path, stacked), say)


def per_model_files(models: Sequence[LoadedModel], directory: Path, say=log.info) -> list[Path]:
    """Each network's export and their stamp in ``directory/onnx``: from the build cache when exported before."""
    return reuse_or_build(per_model_artifact(models, directory), lambda: export_per_model(models, directory), say)


def session(path: Path, device: torch.device, spin: bool = True):
    """An ORT session on torch's thread count. ``spin``: its threads busy-wait between parallel sections and for a
    while after a run (ORT's default). Only where nothing else runs between its runs: where a set's several models
    follow a run with their post-processing in torch, or several sessions take turns, the spinning threads take the
    cores from that work (measured, docs/benchmarks.md 7b: 8 models 100 -> 77 ms an image without it, three
    per-model sessions 170 -> 102 ms; one model 33 -> 35 ms)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


class _Ort(Optimization):
    auto_candidate = True
    devices = ("cpu", "cuda")

    @property
    def spin(self) -> bool:
        """Whether its sessions' threads busy-wait (``session``): only where one model is served, so nothing (another
        model's post-processing, another session) runs between its runs."""
        return len(self.models) == 1

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        try:
            import onnxruntime as ort
        except ImportError:
            return False
        device = torch.device(device)
        if device.type == "cuda":
            return "CUDAExecutionProvider" in ort.get_available_providers()
        return super().supports(device)


@register
class OnnxRuntime(_Ort):
    name = "onnxruntime"
    build_step = "ONNX export of the set's graph"
    stacked: ClassVar[bool] = False  # the models' own parts side by side (True: stacked, onnxruntime_stacked)

    @classmethod
    def build(
        cls, models: Sequence[LoadedModel], artifact_dir: Path, context: BuildContext | None = None
    ) -> list[Path]:
        return set_files(models, Path(artifact_dir), cls.stacked, (context or BuildContext()).log)

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        self.levels = self.models[0].net.config.num_levels
        directory = self.artifacts()
        ensure(
            set_artifact(self.models, directory, self.stacked),
            lambda: set_files(self.models, directory, self.stacked),
            self.name,
            "exporting",
        )
        self.session = session(directory / SET_FILE[self.stacked], self.device, self.spin)

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        outputs = self.session.run(None, {"images": np.ascontiguousarray(images.detach().cpu().numpy())})
        tensors = [torch.from_numpy(o).to(self.device) for o in outputs]
        return split_flat(tensors, self.levels, active)


@register
class OnnxRuntimeStacked(OnnxRuntime):
    name = "onnxruntime_stacked"
    build_step = "ONNX export of the set's graph, the models' own parts stacked"
    stacked = True


@register
class OnnxRuntimePerModel(_Ort):
    name = "onnxruntime_per_model"
    build_step = "ONNX export of each network"
    separable = True

    @classmethod
    def outdone(cls, models: Sequence[LoadedModel]) -> str | None:
        """A set whose models share segments: ``onnxruntime`` runs the same segments on the same runtime, the
        shared ones once; this runs them once per model (and its graphs store them once per model)."""
        plans = [Plan([models[k].net for k in idx]) for _, idx in architecture_groups(models)]
        computed, total = sum(p.computed for p in plans), sum(p.total for p in plans)
        if computed < total:
            return (
                f"the models share work: onnxruntime computes {computed} segments an image where this computes {total}"
            )
        return None

    @classmethod
    def build(
        cls, models: Sequence[LoadedModel], artifact_dir: Path, context: BuildContext | None = None
    ) -> list[Path]:
        return per_model_files(models, Path(artifact_dir), (context or BuildContext()).log)

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        directory = self.artifacts()
        artifact = per_model_artifact(self.models, directory)
        ensure(artifact, lambda: per_model_files(self.models, directory), self.name, "exporting")
        self.sessions = [session(p, self.device, self.spin) for p in per_model_paths(self.models, directory)]

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        x = {"images": np.ascontiguousarray(images.detach().cpu().numpy())}
        out = {}
        for k in active:
            tensors = [torch.from_numpy(o).to(self.device) for o in self.sessions[k].run(None, x)]
            out[k] = (tensors[:5], tensors[5:])
        return out
