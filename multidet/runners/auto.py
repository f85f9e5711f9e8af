"""``auto``: at load time, on the actual device, time the candidate paths on a warm-up image and keep
the fastest whose detections equal the baseline's. The measured table goes to the log.

Candidates are the exact paths this device supports that build quickly (no compilation from
scratch); half precision is a candidate only where its answer passes the same equality check.
On the 2-core development CPU this adds a few seconds to start-up.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Sequence

import torch

from ..compare import compare
from ..device import synchronize
from ..postprocess import detections_for, letterbox_tensors
from ..preprocess import Preprocessor, synthetic_photo
from .base import RUNNERS, RawOutput, Runner, register

log = logging.getLogger(__name__)
CANDIDATES = ("baseline", "channels_last", "grouped", "vmap_backbone", "cuda_graphs", "onnxruntime", "fp16", "bf16")
SLOW_ON_CPU = ("fp16",)  # no fast fp16 kernels on common CPUs: seconds per image


@register
class AutoRunner(Runner):
    name = "auto"

    @classmethod
    def build(cls, models, artifact_dir):
        """The candidates' build-time files (the ONNX export), so auto can time them at load."""
        return [f for name in CANDIDATES if name in RUNNERS for f in RUNNERS[name].build(models, artifact_dir)]

    def __init__(self, models, device, max_detections=100, artifact_dir=None, repeats: int = 3):
        super().__init__(models, device, max_detections, artifact_dir)
        pre = Preprocessor()
        arr, letterbox = pre.letterbox(synthetic_photo())
        x = pre.to_batch([arr], self.device)
        scale, size = letterbox_tensors([letterbox], self.device)
        names = [n for n in CANDIDATES if n in RUNNERS and RUNNERS[n].supports(self.device)
                 and not (self.device.type == "cpu" and n in SLOW_ON_CPU)]
        self.table, reference, best = [], None, None
        for name in names:
            t0 = time.perf_counter()
            try:
                runner = RUNNERS[name](self.models, self.device, max_detections, artifact_dir)
                runner.detect(x, scale, size)  # first call: lazy init, caches
                times = []
                for _ in range(repeats):
                    synchronize(self.device)
                    t1 = time.perf_counter()
                    out = runner.detect(x, scale, size)
                    synchronize(self.device)
                    times.append((time.perf_counter() - t1) * 1e3)
            except Exception as exc:  # a path that fails here is simply not chosen
                log.warning("auto: %s failed on %s: %s", name, self.device, exc)
                self.table.append({"path": name, "ms": None, "equal": False, "error": str(exc)})
                continue
            dets = [d for k, m in enumerate(self.models)
                    for d in detections_for(out[k][0], letterbox, m.name, m.class_names, 0.0)]
            if reference is None:
                reference = dets  # baseline comes first
            agreement = compare(reference, dets)
            equal = agreement.equivalent()
            row = {"path": name, "ms": round(statistics.median(times), 1), "equal": equal,
                   "label_agreement": round(agreement.label_agreement, 4), "load_s": round(time.perf_counter() - t0, 1)}
            self.table.append(row)
            if equal and (best is None or row["ms"] < best[0]["ms"]):
                best = (row, runner)
        self.chosen = best[1]
        log.info("auto on %s: %s -> %s", self.device,
                 "; ".join(f"{r['path']} {r['ms']} ms{'' if r['equal'] else ' (not equal)'}" for r in self.table),
                 self.chosen.name)

    @property
    def description(self) -> str:
        return f"auto:{self.chosen.name}"

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        return self.chosen.forward(images, active)
