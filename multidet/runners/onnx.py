"""``onnxruntime``: the grouped super-model exported to ONE ONNX graph, run by ONNX Runtime.

The export is a build step: ``create_mar.py --optimization onnxruntime`` (``make mar
OPT=onnxruntime``) writes ``artifacts/grouped.onnx`` plus a JSON stamp naming the checkpoints'
sha256 it was exported from, and packs both into the MAR. At load the stamp is checked; a missing or
stale file is re-exported once at load (a warning in the log), never per request. ONNX Runtime's CPU
execution provider is used, or its CUDA provider on a CUDA device when onnxruntime-gpu is installed.
Post-processing (top-k/NMS) stays in PyTorch, shared with every other path.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .base import LoadedModel, RawOutput, Runner, class_head_widths, register, weights_stamp
from .grouped import merge_networks, split_outputs

log = logging.getLogger(__name__)
ONNX_FILE = "grouped.onnx"
OPSET = 17


def _stamp(models: Sequence[LoadedModel]) -> dict:
    return weights_stamp(models, opset=OPSET, torch=torch.__version__)


def export_onnx(models: Sequence[LoadedModel], path: Path) -> Path:
    merged, _, _ = merge_networks([m.net for m in models])
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, *models[0].net.config.image_size)
    with warnings.catch_warnings():
        # torch 2.14 marks the TorchScript-based exporter deprecated in favour of the torch.export
        # one; for this static graph it is the fast, dependency-free choice (opset 17, dynamic batch)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            merged,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=[f"class_{i}" for i in range(5)] + [f"box_{i}" for i in range(5)],
            dynamic_axes={"images": {0: "batch"}},
        )
    path.with_suffix(".json").write_text(json.dumps(_stamp(models), indent=2) + "\n")
    return path


@register
class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"
    auto_candidate = True
    devices = ("cpu", "cuda")
    build_step = "ONNX export of the grouped super-model"

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

    @classmethod
    def build(cls, models: Sequence[LoadedModel], artifact_dir: Path) -> list[Path]:
        path = export_onnx(models, Path(artifact_dir) / ONNX_FILE)
        return [path, path.with_suffix(".json")]

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        import onnxruntime as ort

        self.widths = class_head_widths([m.net for m in self.models])
        self.widest = max(self.widths)  # the exported graph pads every class head to this width
        path = (self.artifact_dir or Path("artifacts")) / ONNX_FILE
        stamp_file = path.with_suffix(".json")
        fresh = path.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == _stamp(self.models)
        if not fresh:
            log.warning(
                "%s missing or exported from other weights: exporting now (build it at MAR build time "
                "with `make mar OPT=onnxruntime`)",
                path,
            )
            export_onnx(self.models, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if self.device.type == "cuda"
            else ["CPUExecutionProvider"]
        )
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        outputs = self.session.run(None, {"images": np.ascontiguousarray(images.detach().cpu().numpy())})
        tensors = [torch.from_numpy(o).to(self.device) for o in outputs]
        return split_outputs(tensors[:5], tensors[5:], self.widths, self.widest, active)
