"""``auto``: at load time, on the actual device, time the candidate optimizations and keep the fastest whose
answer is the baseline's under its tier's rule (multidet.quality). The measured table goes to the log.

Candidates come from the registry (``Optimization.auto_candidate``, less those the device has no units for,
``Optimization.fast_on``: fp16/bf16 emulated on a CPU); which is fastest is measured here, on this machine;
their build step (ONNX exports, OpenVINO IR, the INT8 quantisation when reduced precision is
allowed) runs at MAR build (``Auto.build``), so a load only times them. Each is checked on a
small labelled set handed to the build (``BuildContext.check_set``; the lab's: six images, every model's
objects annotated), kept in ``artifacts/check_set/``; the serving path makes no data and imports no pycocotools
against the baseline:

- exact tier: raw outputs within the optimization's ``raw_tolerance``, detections at the served threshold
  (``Settings.threshold``) equal one to one (boxes within 0.5 px, scores within 1e-3), mAP within 0.1 points;
- reduced tier (bf16/fp16, OpenVINO bf16/INT8), only with ``allow_reduced`` (model-config
  ``handler.allow_reduced``, ``make mar OPT=auto REDUCED=1``): mAP at most 0.5 points below the
  baseline's; the mAP measured is logged.

Order, to keep start-up short: every candidate is timed first (after a warm-up, three rounds of one
single-image call per candidate, interleaved, the median kept); then the baseline's answer
is computed, and the candidates faster than the baseline are checked fastest first until one
passes. Slower ones could not be chosen, so they are not checked (their row says so). The table
(ms, mAP@0.5 where checked, why an optimization was refused) goes to the log.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..artifacts import Artifact
from ..device import synchronize
from ..postprocess import detections_for
from ..preprocess import Preprocessor
from ..quality import SERVING_THRESHOLD, coco_map, coco_results, judge, raw_difference
from ..timing import interleaved
from .base import OPTIMIZATIONS, BuildContext, Optimization, RawOutput, register

log = logging.getLogger(__name__)
CHECK_DIR = "check_set"  # under the artifact dir: the labelled images auto checks its candidates on
CHECK_COUNT, CHECK_SEED = 6, 1234


def check_artifact(models, artifact_dir: Path) -> Artifact:
    folder = Path(artifact_dir) / CHECK_DIR
    stamp = {
        "count": CHECK_COUNT,
        "seed": CHECK_SEED,
        "models": [
            [m.name, list(m.class_names), list(m.trained_ids or ()), list(m.trained_kinds or ())] for m in models
        ],
    }
    files = [folder / f"check_{i}.jpg" for i in range(CHECK_COUNT)] + [folder / "truth.json"]
    return Artifact(files, folder / "stamp.json", stamp)


def write_check_set(models, artifact_dir: Path, context: BuildContext) -> list[Path]:
    """The labelled check set (``context.check_set``), written at archive build: at load auto only reads it."""
    if context.check_set is None:
        raise RuntimeError("auto's build needs a labelled check set: a BuildContext with check_set (detlab.build)")
    bodies, truth = context.check_set(models, CHECK_COUNT, CHECK_SEED)
    artifact = check_artifact(models, artifact_dir)
    artifact.files[0].parent.mkdir(parents=True, exist_ok=True)
    for path, body in zip(artifact.files, bodies):
        path.write_bytes(body)
    artifact.files[-1].write_text(json.dumps(truth) + "\n")
    artifact.write_stamp()
    return artifact.paths


def read_check_set(models, artifact_dir: Path) -> tuple[list[bytes], dict]:
    artifact = check_artifact(models, artifact_dir)
    if not artifact.fresh():
        raise RuntimeError(
            f"auto's labelled check set is missing in {artifact.stamp_file.parent} or made for other models: "
            "build the optimization before serving it (make mar OPT=auto; make serve-ray builds it for Ray)"
        )
    return [p.read_bytes() for p in artifact.files[:-1]], json.loads(artifact.files[-1].read_text())


# between timed calls: ONNX Runtime's and OpenVINO's worker threads spin for a moment after a call;
# without a pause they would slow down whichever optimization is timed next
PAUSE_S = 0.02


def candidates(device: torch.device, allow_reduced: bool) -> list[str]:
    """The optimizations auto times on ``device``, baseline first."""
    names = [
        n
        for n, cls in OPTIMIZATIONS.items()
        if cls.auto_candidate
        and cls.supports(device)
        and cls.fast_on(device)
        and (cls.tier == "exact" or allow_reduced)
    ]
    return sorted(names, key=lambda n: n != "baseline")


@register
class Auto(Optimization):
    name = "auto"
    chooses = True

    @classmethod
    def build(cls, models, artifact_dir, context: BuildContext | None = None):
        """The candidates' build-time files (ONNX exports, OpenVINO IR; INT8 only when reduced precision
        is allowed), so auto can time them at load without building anything."""
        context = context or BuildContext()
        return write_check_set(models, artifact_dir, context) + [
            f
            for c in OPTIMIZATIONS.values()
            if c.auto_candidate and (c.tier == "exact" or context.allow_reduced) and not c.outdone(models)
            for f in c.build(models, artifact_dir, context)
        ]

    def __init__(
        self,
        models,
        device,
        max_detections=100,
        artifact_dir=None,
        allow_reduced: bool = False,
        repeats: int = 3,
        threshold: float = SERVING_THRESHOLD,
    ):
        super().__init__(models, device, max_detections, artifact_dir)
        self.allow_reduced = allow_reduced
        self.threshold = threshold  # the served score threshold: where answers are compared
        bodies, truth = read_check_set(self.models, self.artifacts())
        batch = Preprocessor(self.models[0].net.config).prepare_bytes(bodies, self.device)
        one = batch.head(1)
        active = list(range(len(self.models)))
        # timed as served: post-processing at the served threshold (candidates below it dropped before the top-k);
        # at 0 every candidate goes through top-k and NMS, which with many models outweighed the networks
        served = torch.full((1,), float(self.threshold), device=self.device)  # as the pipeline makes it
        self.table: list[dict] = []
        timed: dict[str, tuple[Optimization, dict, dict]] = {}  # name -> (optimization, raw outputs of one image, row)
        # 1. every candidate built and warmed up (any lazy init, a runtime's first-call allocations) ...
        for name in candidates(self.device, allow_reduced):
            cls = OPTIMIZATIONS[name]
            outdone = cls.outdone(self.models)
            if outdone:  # not built either (``build``)
                self.table.append({"optimization": name, "tier": cls.tier, "ms": None, "equal": None, "why": outdone})
                continue
            t0 = time.perf_counter()
            try:
                optimization = cls(self.models, self.device, max_detections, self.artifacts())
                with torch.inference_mode():
                    raw = optimization.forward(one.tensor, active)  # also the raw outputs for the check
                    optimization.detect(one, None, served)
            except Exception as exc:  # an optimization that fails here is simply not chosen
                log.warning("auto: %s failed on %s: %s", name, self.device, exc)
                self.table.append(
                    {"optimization": name, "tier": cls.tier, "ms": None, "equal": False, "error": str(exc)}
                )
                continue
            row = {"optimization": name, "tier": cls.tier, "load_s": round(time.perf_counter() - t0, 1)}
            self.table.append(row)
            timed[name] = (optimization, raw, row)
        # ... then timed on one image in interleaved rounds (a noisy moment hits every optimization alike)
        calls = {name: (lambda r, o=entry[0]: o.detect(one, None, served)) for name, entry in timed.items()}
        with torch.inference_mode():
            times = interleaved(calls, repeats, pause_s=PAUSE_S, sync=lambda: synchronize(self.device)).ms
        for name, ms in times.items():
            timed[name][2]["ms"] = round(statistics.median(ms), 1)
        if "baseline" not in timed:
            raise RuntimeError(f"auto: the baseline itself failed on {self.device}: {self.table[0].get('error')}")
        # 2. the baseline's answer on the labelled check set
        base_optimization, base_raw, chosen = timed["baseline"]
        reference = self._check(base_optimization, batch, truth)
        chosen.update(map50=reference[1], equal=True)
        # 3. the candidates faster than the baseline, fastest first, until one gives its answer; the
        #    slower ones cannot be chosen, so they are not checked (start-up time)
        for name in sorted(timed, key=lambda n: timed[n][2]["ms"]):
            optimization, raw, row = timed[name]
            if name == "baseline":
                continue
            if row["ms"] >= chosen["ms"]:
                row.update(equal=None, why=f"not faster than {chosen['optimization']}: not checked")
                continue
            answer, maps = self._check(optimization, batch, truth)
            row["map50"] = maps
            reasons = []
            cls = OPTIMIZATIONS[name]
            if cls.tier == "exact" and cls.raw_tolerance is not None:
                diff = max(raw_difference(base_raw[k][0] + base_raw[k][1], raw[k][0] + raw[k][1]) for k in active)
                row["raw_diff"] = float(f"{diff:.3g}")
                if diff > cls.raw_tolerance:
                    reasons.append(f"raw outputs differ by {diff:.2g} > {cls.raw_tolerance:g}")
            mine = {m: {"mAP@0.5": v} for m, v in maps.items()}
            base = {m: {"mAP@0.5": v} for m, v in reference[1].items()}
            reasons += judge(reference[0], answer, base, mine, cls.tier, self.threshold).reasons
            row["equal"] = not reasons
            if reasons:
                row["why"] = "; ".join(reasons)
            else:
                chosen = row
        self.chosen = timed[chosen["optimization"]][0]
        timed.clear()  # the optimizations not chosen are released here
        log.info(
            "auto on %s (reduced precision %s, answers compared at threshold %g): %s -> %s",
            self.device,
            "allowed" if allow_reduced else "not allowed",
            self.threshold,
            "; ".join(
                f"{r['optimization']} {r['ms']} ms"
                + (f" mAP@0.5 {r['map50']}" if r.get("map50") else "")
                + ("" if r.get("equal") else f" ({r.get('why', r.get('error'))})")
                for r in self.table
            ),
            self.chosen.name,
        )

    def _check(self, optimization: Optimization, batch, truth) -> tuple[list[list[dict]], dict[str, float]]:
        """The optimization's answer on the check set and its mAP@0.5 per model."""
        with torch.inference_mode():
            out = optimization.detect(batch)
        answer = self._answer(out, batch.letterboxes)
        maps = {
            m.name: round(coco_map(truth[m.name], coco_results(answer, m.name))[0], 4)
            for k, m in enumerate(self.models)
        }
        return answer, maps

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
