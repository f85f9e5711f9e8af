"""``auto``: at load time, on the actual device, time the candidate paths and keep the fastest whose
answer is the baseline's under its tier's rule (multidet.quality). The measured table goes to the log.

Candidates come from the registry (``Runner.auto_candidate``, less the paths with no fast kernels on
this device, ``Runner.slow_on``). Each is checked on a small labelled set made in memory
(``synthetic.check_set``: six images, every model's objects annotated) against the baseline:

- exact tier: raw outputs within the path's ``raw_tolerance``, detections at the serving threshold
  equal one to one (boxes within 0.5 px, scores within 1e-3), mAP within 0.1 points;
- reduced tier (bf16/fp16), only with ``allow_reduced`` (model-config ``handler.allow_reduced``,
  ``make mar OPT=auto REDUCED=1``): mAP at most 0.5 points below the baseline's; the mAP measured is
  logged.

Speed: median of three single-image requests, after one warm-up call. On the 2-core development CPU
this adds 10-20 s to start-up.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence

import torch

from ..device import synchronize
from ..postprocess import detections_for
from ..preprocess import Preprocessor
from ..quality import RULES, SERVING_THRESHOLD, check_detections, coco_map, map_ok, raw_difference
from ..synthetic import check_set
from .base import RUNNERS, RawOutput, Runner, register

log = logging.getLogger(__name__)


def candidates(device: torch.device, allow_reduced: bool) -> list[str]:
    """The paths auto times on ``device``, baseline first."""
    names = [
        n
        for n, cls in RUNNERS.items()
        if cls.auto_candidate
        and cls.supports(device)
        and device.type not in cls.slow_on
        and (cls.tier == "exact" or allow_reduced)
    ]
    return sorted(names, key=lambda n: n != "baseline")


@register
class AutoRunner(Runner):
    name = "auto"
    chooses = True

    @classmethod
    def build(cls, models, artifact_dir):
        """The candidates' build-time files (the ONNX export), so auto can time them at load."""
        return [f for name, c in RUNNERS.items() if c.auto_candidate for f in c.build(models, artifact_dir)]

    def __init__(
        self, models, device, max_detections=100, artifact_dir=None, allow_reduced: bool = False, repeats: int = 3
    ):
        super().__init__(models, device, max_detections, artifact_dir)
        self.allow_reduced = allow_reduced
        pre = Preprocessor()
        bodies, truth = check_set(models=[m.name for m in self.models])
        batch = pre.prepare_bytes(bodies, self.device)
        active = list(range(len(self.models)))
        self.table, reference, best = [], None, None
        for name in candidates(self.device, allow_reduced):
            cls = RUNNERS[name]
            rule = RULES[cls.tier]
            t0 = time.perf_counter()
            try:
                runner = cls(self.models, self.device, max_detections, artifact_dir)
                with torch.inference_mode():
                    raw = runner.forward(batch.tensor[:1], active)  # raw outputs of one image; also any lazy init
                    out = runner.detect(batch)
                    times = []
                    for _ in range(repeats):
                        synchronize(self.device)
                        t1 = time.perf_counter()
                        runner.detect(batch.head(1))
                        synchronize(self.device)
                        times.append((time.perf_counter() - t1) * 1e3)
            except Exception as exc:  # a path that fails here is simply not chosen
                log.warning("auto: %s failed on %s: %s", name, self.device, exc)
                self.table.append({"path": name, "tier": cls.tier, "ms": None, "equal": False, "error": str(exc)})
                continue
            answer = self._answer(out, batch.letterboxes)
            maps = {
                m.name: coco_map(truth[m.name], _coco_results(answer, k, m.name))[0] for k, m in enumerate(self.models)
            }
            row = {
                "path": name,
                "tier": cls.tier,
                "ms": round(statistics.median(times), 1),
                "map50": {k: round(v, 4) for k, v in maps.items()},
                "load_s": round(time.perf_counter() - t0, 1),
            }
            if reference is None:  # the baseline comes first
                reference = (raw, answer, maps)
                row["equal"] = True
            else:
                reasons = []
                if cls.tier == "exact" and cls.raw_tolerance is not None:
                    diff = max(
                        raw_difference(reference[0][k][0] + reference[0][k][1], raw[k][0] + raw[k][1]) for k in active
                    )
                    row["raw_diff"] = float(f"{diff:.3g}")
                    if diff > cls.raw_tolerance:
                        reasons.append(f"raw outputs differ by {diff:.2g} > {cls.raw_tolerance:g}")
                if rule.box_tol is not None:
                    checks = [check_detections(r, c, SERVING_THRESHOLD, rule) for r, c in zip(reference[1], answer)]
                    bad = [c for c in checks if not c.ok(rule)]
                    if bad:
                        reasons.append(f"detections differ: {bad[0]}")
                for m, base_map in reference[2].items():
                    if not map_ok(base_map, maps[m], rule):
                        reasons.append(f"{m} mAP@0.5 {maps[m]:.4f} vs baseline {base_map:.4f}")
                row["equal"] = not reasons
                if reasons:
                    row["why"] = "; ".join(reasons)
            self.table.append(row)
            if row["equal"] and (best is None or row["ms"] < best[0]["ms"]):
                best = (row, runner)
        self.chosen = best[1]
        log.info(
            "auto on %s (reduced precision %s): %s -> %s",
            self.device,
            "allowed" if allow_reduced else "not allowed",
            "; ".join(
                f"{r['path']} {r['ms']} ms"
                + (f" mAP@0.5 {r['map50']}" if r.get("map50") else "")
                + ("" if r["equal"] else f" (not equal: {r.get('why', r.get('error'))})")
                for r in self.table
            ),
            self.chosen.name,
        )

    def _answer(self, out: dict[int, torch.Tensor], letterboxes) -> list[list[dict]]:
        """Per image: every model's detections (threshold 0) in original pixels, as a response has them."""
        return [
            [d for k, m in enumerate(self.models) for d in detections_for(out[k][i], lb, m.name, m.class_names, 0.0)]
            for i, lb in enumerate(letterboxes)
        ]

    @property
    def description(self) -> str:
        return f"auto:{self.chosen.name}"

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        return self.chosen.forward(images, active)


def _coco_results(answer: list[list[dict]], k: int, model: str) -> list[dict]:
    return [
        {
            "image_id": i + 1,
            "category_id": d["class_id"],
            "score": d["score"],
            "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]],
        }
        for i, dets in enumerate(answer)
        for d in dets
        if d["model"] == model
    ]
