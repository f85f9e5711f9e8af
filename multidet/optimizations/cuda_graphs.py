"""``cuda_graphs`` (CUDA only): the grouped super-model replayed from a captured CUDA graph.

The fused network (``grouped``: BatchNorm folded, the three models' convolutions merged) is
captured once per input shape into a ``torch.cuda.CUDAGraph`` with a static input buffer. A request
copies its batch into that buffer and replays the graph: one launch for the whole network instead
of hundreds of kernel launches from Python. The merged weights live in the module's parameters on
the device, so a replay reads them in place and copies nothing but the input. Post-processing
(top-k, NMS) runs eagerly afterwards on views of the graph's static outputs, on the same stream, so
the next replay cannot overwrite them before they are read.

Shapes are static: each batch size TorchServe hands the handler (1 .. batchSize) is captured on
first use (a few warm-up passes on a side stream first, as capture requires), then replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..sharing import split_flat
from .base import RawOutput, register
from .grouped import Grouped

log = logging.getLogger(__name__)
WARMUP_PASSES = 3


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_output: list[torch.Tensor]  # every model's levels, flat (sharing.split_flat)
    replays: int = 0


@register
class CudaGraphs(Grouped):
    name = "cuda_graphs"
    devices = ("cuda",)

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        return super().supports(device) and torch.cuda.is_available()

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        self.graphs: dict[tuple, _Captured] = {}

    def _capture(self, images: torch.Tensor) -> _Captured:
        static_input = images.clone()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # lazy initialisation and cuDNN's algorithm choice stay outside the graph
            for _ in range(WARMUP_PASSES):
                self.network(static_input)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.network(static_input)
        log.info("captured a CUDA graph for input %s", tuple(images.shape))
        return _Captured(graph, static_input, static_output)

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        key = (tuple(images.shape), images.dtype)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(images)
        captured.static_input.copy_(images)
        captured.graph.replay()
        captured.replays += 1
        return split_flat(captured.static_output, self.levels, active)
