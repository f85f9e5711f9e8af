"""The whole data path for a batch of requests: decode -> preprocess -> run -> postprocess -> JSON.

``Detector.predict`` takes raw image bytes with per-request options and returns, per request,
either the response dict (schema in README) or the ``InputError`` that request caused. One bad
request never affects the others in its batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .checkpoints import load_checkpoint
from .config import MODEL_SPECS, Settings
from .decode import decode_image
from .device import synchronize
from .envelopes import RequestOptions
from .errors import InputError, ProcessingFailed
from .postprocess import detections_for, merge
from .preprocess import Preprocessor
from .runners import LoadedModel, create_runner

log = logging.getLogger(__name__)


class Detector:
    """Three (or a configured subset of) EfficientDet-D0 models behind one runner."""

    def __init__(
        self, models: Sequence[LoadedModel], settings: Settings, device: torch.device, artifact_dir: Path | None = None
    ):
        self.settings = settings
        self.device = torch.device(device)
        self.models = list(models)
        self.model_names = tuple(m.name for m in self.models)
        self.preprocessor = Preprocessor()
        self.runner = create_runner(
            settings.optimization,
            self.models,
            self.device,
            settings.max_detections,
            artifact_dir,
            allow_reduced=settings.allow_reduced,
        )

    @classmethod
    def from_checkpoints(
        cls,
        checkpoint_dir: Path | str,
        settings: Settings,
        device: torch.device,
        artifact_dir: Path | str | None = None,
    ) -> Detector:
        models = []
        for name in settings.models:
            meta, net = load_checkpoint(Path(checkpoint_dir), name)
            if meta.num_classes != MODEL_SPECS[name].num_classes:
                log.warning(
                    "%s: checkpoint has %d classes, the built-in spec %d; using the checkpoint's names",
                    name,
                    meta.num_classes,
                    MODEL_SPECS[name].num_classes,
                )
            models.append(LoadedModel(name=name, class_names=tuple(meta.class_names), net=net))
        return cls(models, settings, device, Path(artifact_dir) if artifact_dir is not None else None)

    # -- the data path ---------------------------------------------------------------------------
    def predict(
        self,
        bodies: Sequence[bytes],
        options: Sequence[RequestOptions] | None = None,
    ) -> list[dict | InputError]:
        options = list(options) if options is not None else [RequestOptions()] * len(bodies)
        results: list[dict | InputError] = [None] * len(bodies)  # type: ignore[list-item]
        timings = [dict() for _ in bodies]
        ok, letterboxed = [], []
        for idx, body in enumerate(bodies):
            t0 = time.perf_counter()
            try:
                image = decode_image(body, self.settings.max_image_pixels)
                t1 = time.perf_counter()
                letterboxed.append(self.preprocessor.letterbox(image))
            except InputError as err:
                results[idx] = err
                continue
            except Exception as exc:  # one image must not take its batch down with it
                log.exception("preprocessing request %d failed", idx)
                results[idx] = ProcessingFailed(f"could not process this image ({type(exc).__name__}: {exc})")
                continue
            t2 = time.perf_counter()
            timings[idx].update(decode=(t1 - t0) * 1e3, preprocess=(t2 - t1) * 1e3)
            ok.append(idx)
        if not ok:
            return results

        wanted = {name for i in ok for name in (options[i].models or self.model_names)}
        active = [k for k, name in enumerate(self.model_names) if name in wanted]
        t0 = time.perf_counter()
        batch = self.preprocessor.collate(letterboxed, self.device)
        thresholds = torch.tensor([self._threshold(options[i]) for i in ok], device=self.device)
        t1 = time.perf_counter()
        detections = self.runner.detect(batch, active, thresholds)
        detections = {k: v.cpu() for k, v in detections.items()}
        synchronize(self.device)
        t2 = time.perf_counter()
        share = (t1 - t0) * 1e3 / len(ok)  # batch normalisation is preprocessing, split evenly
        for pos, idx in enumerate(ok):
            t3 = time.perf_counter()
            opts, letterbox = options[idx], batch.letterboxes[pos]
            threshold = self._threshold(opts)
            per_model = {}
            for k in active:
                model = self.models[k]
                if opts.models is None or model.name in opts.models:
                    per_model[model.name] = detections_for(
                        detections[k][pos], letterbox, model.name, model.class_names, threshold
                    )
            dets, summary = merge(per_model, {m.name: m.num_classes for m in self.models})
            t = timings[idx]
            t["preprocess"] += share
            t["inference"] = (t2 - t1) * 1e3
            t["postprocess"] = (time.perf_counter() - t3) * 1e3
            t["total"] = t["decode"] + t["preprocess"] + t["inference"] + t["postprocess"]
            results[idx] = {
                "image": {"width": letterbox.width, "height": letterbox.height},
                "optimization": self.runner.description,
                "device": str(self.device),
                "detections": dets,
                "models": summary,
                "timing_ms": {k: round(v, 3) for k, v in t.items()},
            }
        return results

    def _threshold(self, options: RequestOptions) -> float:
        return self.settings.threshold if options.threshold is None else options.threshold

    def predict_one(self, body: bytes, options: RequestOptions | None = None) -> dict:
        result = self.predict([body], [options or RequestOptions()])[0]
        if isinstance(result, InputError):
            raise result
        return result

    def warmup(self, iterations: int = 2) -> float:
        """Run a synthetic image through the whole path; returns the last run's milliseconds."""
        import io

        buf = io.BytesIO()
        Image.new("RGB", (640, 480), (124, 116, 104)).save(buf, format="JPEG")
        elapsed = 0.0
        for _ in range(iterations):
            t0 = time.perf_counter()
            self.predict_one(buf.getvalue(), RequestOptions(threshold=0.0))
            elapsed = (time.perf_counter() - t0) * 1e3
        return elapsed
