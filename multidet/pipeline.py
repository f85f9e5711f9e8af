"""The whole data path for a batch of requests: decode -> preprocess -> run -> postprocess -> JSON.

The models may be of several effdet architectures: each image is letterboxed once per distinct
input size, and each architecture's models run on one instance of the chosen optimization (``Group``), so
optimizations that stack models (vmap, grouped, the grouped ONNX graph) stack the models of one architecture.

``Detector.predict`` takes raw image bytes with per-request options and returns, per request,
either the response dict (schema in README) or the ``InputError`` that request caused. One bad
request never affects the others in its batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .artifacts import folder_of
from .config import Settings
from .device import hold_freed_memory, synchronize
from .envelopes import RequestOptions
from .errors import InputError, ProcessingFailed
from .isolation import decoder_for
from .modelset import ModelSet, load_models, read_model_set
from .optimizations import LoadedModel, Optimization, architecture_groups, create_optimization, group_artifact_dir
from .postprocess import detections_for, merge
from .preprocess import Batch, Letterbox, Preprocessor
from .sharing import Plan, summary

log = logging.getLogger(__name__)


@dataclass
class Group:
    """The models of one architecture: one letterbox size, one instance of the chosen optimization."""

    architecture: str
    indices: list[int]  # positions in Detector.models
    preprocessor: Preprocessor
    optimization: Optimization


class Detector:
    """The models of a model set (or a subset of it) behind one optimization per architecture."""

    def __init__(
        self, models: Sequence[LoadedModel], settings: Settings, device: torch.device, artifact_dir: Path | None = None
    ):
        self.settings = settings
        self.device = torch.device(device)
        if settings.hold_memory:
            hold_freed_memory()
        self.models = list(models)
        if not self.models:
            raise ValueError("a Detector needs at least one model")
        self.model_names = tuple(m.name for m in self.models)
        if len(set(self.model_names)) != len(self.model_names):
            raise ValueError(f"model names must be unique, got {list(self.model_names)}")
        artifact_dir = folder_of(settings.optimization, artifact_dir)  # where a build for the same folder put them
        groups = architecture_groups(self.models)
        preprocessors: dict[tuple, Preprocessor] = {}
        self.groups: list[Group] = []
        for arch, idx in groups:
            pre = Preprocessor(self.models[idx[0]].net.config)
            pre = preprocessors.setdefault(pre.key, pre)  # one letterbox per distinct input size
            optimization = create_optimization(
                settings.optimization,
                [self.models[k] for k in idx],
                self.device,
                settings.max_detections,
                group_artifact_dir(artifact_dir, arch, len(groups)),
                allow_reduced=settings.allow_reduced,
                threshold=settings.threshold,
            )
            self.groups.append(Group(arch, idx, pre, optimization))
        # what the models of each architecture share (found from the weights; every set-wide optimization runs it once)
        self.sharing = {
            arch: Plan([self.models[k].net for k in idx]).describe([self.models[k].name for k in idx])
            for arch, idx in groups
        }
        for arch, shared in self.sharing.items():
            log.info("sharing (%s): %s", arch, summary(shared))
        self.preprocessors = list(preprocessors.values())
        self.decoder = decoder_for(settings)  # in-process, or a child with a deadline (decode_deadline_s)

    @classmethod
    def from_model_set(
        cls,
        model_set: ModelSet | Path | str,
        settings: Settings,
        device: torch.device,
        artifact_dir: Path | str | None = None,
    ) -> Detector:
        """Load the set's models (a ModelSet, a models file, or a folder holding ``models.yaml``),
        the subset ``settings.models`` where given."""
        if not isinstance(model_set, ModelSet):
            model_set = read_model_set(model_set)
        models = load_models(model_set, settings.models or None)
        return cls(models, settings, device, Path(artifact_dir) if artifact_dir is not None else None)

    # -- one architecture (the usual set): its optimization and letterbox ---------------------------------
    @property
    def optimization(self) -> Optimization:
        """The optimization of a one-architecture set (a mixed set has one per group: ``groups``)."""
        if len(self.groups) != 1:
            raise AttributeError(f"this set has {len(self.groups)} architectures: use Detector.groups")
        return self.groups[0].optimization

    @property
    def preprocessor(self) -> Preprocessor:
        if len(self.preprocessors) != 1:
            raise AttributeError(f"this set has {len(self.preprocessors)} input sizes: use Detector.groups")
        return self.preprocessors[0]

    @property
    def description(self) -> str:
        """What the response's "optimization" field says: the path, or per architecture where they differ."""
        names = [g.optimization.description for g in self.groups]
        if len(set(names)) == 1:
            return names[0]
        return ",".join(f"{g.architecture}={n}" for g, n in zip(self.groups, names))

    def describe(self) -> dict:
        """What a front answers when asked to describe the model (TorchServe's describe header,
        ``GET /models/all?customized=true``): the models, the optimization, the device."""
        return {
            "models": [
                {"name": m.name, "architecture": m.architecture, "classes": len(m.class_names)} for m in self.models
            ],
            "optimization": self.description,
            "device": str(self.device),
            "sharing": self.sharing,
        }

    def threshold_for(self, options: RequestOptions, model: LoadedModel) -> float:
        """The request's threshold, else the model's own, else the service's."""
        if options.threshold is not None:
            return options.threshold
        return model.threshold if model.threshold is not None else self.settings.threshold

    def detect(
        self,
        batches: dict[tuple, Batch],
        active: Sequence[int],
        thresholds: dict[int, torch.Tensor] | None = None,
        ms: dict[int, float] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Per active model index (into ``models``): its [B, max_det, 6] detections in network pixels.
        ``batches``: one Batch per preprocessor key (``prepare``). ``ms``, where given, gets per model index the
        milliseconds of its group's run (the models of one architecture run together)."""
        wanted, out = set(active), {}
        for g in self.groups:
            local = [j for j, k in enumerate(g.indices) if k in wanted]
            if not local:
                continue
            per_model = None if thresholds is None else {j: thresholds[g.indices[j]] for j in local}
            t0 = time.perf_counter()
            for j, dets in g.optimization.detect(batches[g.preprocessor.key], local, per_model).items():
                out[g.indices[j]] = dets
            if ms is not None:
                synchronize(self.device)
                ms.update({g.indices[j]: (time.perf_counter() - t0) * 1e3 for j in local})
        return out

    def prepare(self, images: Sequence[Image.Image]) -> dict[tuple, Batch]:
        """Decoded images -> one Batch per distinct input size, on the device."""
        return {pre.key: pre.prepare(images, self.device) for pre in self.preprocessors}

    # -- the data path ---------------------------------------------------------------------------
    def predict(
        self,
        bodies: Sequence[bytes],
        options: Sequence[RequestOptions] | None = None,
    ) -> list[dict | InputError]:
        options = list(options) if options is not None else [RequestOptions()] * len(bodies)
        results: list[dict | InputError] = [None] * len(bodies)  # type: ignore[list-item]
        timings = [dict() for _ in bodies]
        ok: list[int] = []
        letterboxed: dict[tuple, list[tuple[np.ndarray, Letterbox]]] = {pre.key: [] for pre in self.preprocessors}
        for idx, body in enumerate(bodies):
            t0 = time.perf_counter()
            try:
                image = self.decoder(body)
                t1 = time.perf_counter()
                boxes = {pre.key: pre.letterbox(image) for pre in self.preprocessors}
            except InputError as err:
                results[idx] = err
                continue
            except Exception as exc:  # one image must not take its batch down with it
                log.exception("preprocessing request %d failed", idx)
                results[idx] = ProcessingFailed(f"could not process this image ({type(exc).__name__}: {exc})")
                continue
            for key, item in boxes.items():
                letterboxed[key].append(item)
            t2 = time.perf_counter()
            timings[idx].update(decode=(t1 - t0) * 1e3, preprocess=(t2 - t1) * 1e3)
            ok.append(idx)
        if not ok:
            return results

        wanted = {name for i in ok for name in (options[i].models or self.model_names)}
        active = [k for k, name in enumerate(self.model_names) if name in wanted]
        t0 = time.perf_counter()
        batches = {pre.key: pre.collate(letterboxed[pre.key], self.device) for pre in self.preprocessors}
        thresholds = {
            k: torch.tensor([self.threshold_for(options[i], self.models[k]) for i in ok], device=self.device)
            for k in active
        }
        t1 = time.perf_counter()
        model_ms: dict[int, float] = {}
        detections = self.detect(batches, active, thresholds, model_ms)
        detections = {k: v.cpu() for k, v in detections.items()}
        synchronize(self.device)
        t2 = time.perf_counter()
        share = (t1 - t0) * 1e3 / len(ok)  # batch normalisation is preprocessing, split evenly
        key_of = {k: g.preprocessor.key for g in self.groups for k in g.indices}
        for pos, idx in enumerate(ok):
            t3 = time.perf_counter()
            opts = options[idx]
            per_model = {}
            for k in active:
                model = self.models[k]
                if opts.models is None or model.name in opts.models:
                    per_model[model.name] = detections_for(
                        detections[k][pos],
                        batches[key_of[k]].letterboxes[pos],
                        model.name,
                        model.class_names,
                        self.threshold_for(opts, model),
                    )
            dets, summary = merge(per_model, {m.name: m.num_classes for m in self.models})
            ms_of = {self.models[k].name: model_ms[k] for k in active}
            summary = [{**entry, "inference_ms": round(ms_of[entry["name"]], 3)} for entry in summary]
            letterbox = batches[self.preprocessors[0].key].letterboxes[pos]
            t = timings[idx]
            t["preprocess"] += share
            t["inference"] = (t2 - t1) * 1e3
            t["postprocess"] = (time.perf_counter() - t3) * 1e3
            t["total"] = t["decode"] + t["preprocess"] + t["inference"] + t["postprocess"]
            results[idx] = {
                "image": {"width": letterbox.width, "height": letterbox.height},
                "optimization": self.description,
                "device": str(self.device),
                "detections": dets,
                "models": summary,
                "timing_ms": {k: round(v, 3) for k, v in t.items()},
            }
        return results

    def answer(self, requests: Sequence[object]) -> list[tuple[object, list[dict | InputError] | None]]:
        """A batch of parsed requests (any object with ``instances``: image + options pairs or the
        InputError each is; anything else, e.g. an InputError for a whole request, passes through) ->
        per request ``(request, results)``, every good instance of the batch run in one ``predict`` call.
        What every serving front calls (the TorchServe handler, the Ray Serve deployment)."""
        parsed = [r for r in requests if isinstance(getattr(r, "instances", None), list)]
        good = [item for r in parsed for item in r.instances if not isinstance(item, InputError)]
        outputs = iter(self.predict([body for body, _ in good], [opts for _, opts in good]) if good else [])
        return [
            (r, [item if isinstance(item, InputError) else next(outputs) for item in r.instances])
            if isinstance(getattr(r, "instances", None), list)
            else (r, None)
            for r in requests
        ]

    def predict_one(self, body: bytes, options: RequestOptions | None = None) -> dict:
        result = self.predict([body], [options or RequestOptions()])[0]
        if isinstance(result, InputError):
            raise result
        return result

    def close(self) -> None:
        """End what this Detector runs beyond its own memory (the decode child); both fronts call it when they
        stop (the handler at the worker's exit, the Ray replica at its shutdown). Calling it again does nothing."""
        self.decoder.close()

    def warmup(self, iterations: int = 2) -> float:
        """Run a synthetic image through the whole data path; returns the last run's milliseconds."""
        import io

        buf = io.BytesIO()
        Image.new("RGB", (640, 480), (124, 116, 104)).save(buf, format="JPEG")
        elapsed = 0.0
        for _ in range(iterations):
            t0 = time.perf_counter()
            self.predict_one(buf.getvalue(), RequestOptions(threshold=0.0))
            elapsed = (time.perf_counter() - t0) * 1e3
        return elapsed
