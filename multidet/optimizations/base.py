"""The model-running step: one interface, one class per optimization, chosen by name.

An optimization gets loaded networks of ONE architecture (the Detector gives each architecture of a mixed
set its own instance of the same optimization: ``architecture_groups``) and turns a normalised NCHW batch
into, per model, effdet's detections ``[B, max_det, 6]`` in network pixels. Optimizations differ in how they run the
networks (``forward``); the top-k/NMS step (``postprocess.select_detections``) is shared, so every
optimization is compared with the baseline on the same post-processing.
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from effdet.anchors import Anchors

from ..postprocess import select_detections
from ..preprocess import Batch
from ..quality import SERVING_THRESHOLD
from ..weights import CLASS_HEAD, LoadedModel

RawOutput = tuple[list[torch.Tensor], list[torch.Tensor]]  # per level: class logits, box regressions

# CLASS_HEAD (anchors x classes outputs) is the only layer whose shape depends on num_classes: vmap
# pads it to the widest (stacked weights need one shape); grouped keeps one conv per model.
Thresholds = torch.Tensor | Mapping[int, torch.Tensor] | None  # [B] for every model, or per model index


def architecture_groups(models: Sequence[LoadedModel]) -> list[tuple[str, list[int]]]:
    """The set's architectures in order of first appearance, each with its models' indices: one optimization
    (and one letterbox size) each. A set of one architecture is one group of every model."""
    groups: dict[str, list[int]] = {}
    for k, m in enumerate(models):
        groups.setdefault(m.architecture, []).append(k)
    return list(groups.items())


def group_artifact_dir(artifact_dir: Path | None, architecture: str, groups: int) -> Path | None:
    """Where one architecture's build files go: the artifact dir itself for a one-architecture set,
    else a folder per architecture (build and load derive it the same way)."""
    if artifact_dir is None or groups == 1:
        return artifact_dir
    return Path(artifact_dir) / architecture


CheckSet = tuple[list[bytes], dict]  # JPEG bodies; per model name, COCO ground truth of its objects in them


@dataclass(frozen=True)
class BuildContext:
    """What a build step may need besides the models, handed in by its caller (the archive builder, the Ray
    launcher, a test: the lab's ``detlab.build.context``); the runtime makes no data of its own."""

    allow_reduced: bool = False  # auto builds its reduced-precision candidates too (INT8 IR)
    # (models, count, seed) -> the labelled images ``auto`` checks its candidates on
    check_set: Callable[[Sequence[LoadedModel], int, int], CheckSet] | None = None
    # (model, count, seed) -> that many of the model's own training images (PIL RGB): INT8 calibration
    calibration: Callable[[LoadedModel, int, int], list] | None = None
    log: Callable[[str], None] = print  # build progress


def build_optimization(
    name: str, models: Sequence[LoadedModel], artifact_dir: Path, context: BuildContext | None = None
) -> list[Path]:
    """An optimization's build step for a whole set: ``Optimization.build`` once per architecture group."""
    cls = OPTIMIZATIONS[name]
    groups = architecture_groups(models)
    files: list[Path] = []
    for arch, idx in groups:
        target = group_artifact_dir(Path(artifact_dir), arch, len(groups))
        files += cls.build([models[k] for k in idx], target, context or BuildContext())
    return files


def class_head_widths(nets: Sequence[torch.nn.Module]) -> list[int]:
    return [net.get_submodule(CLASS_HEAD).out_channels for net in nets]


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad dim 0 to ``rows`` (extra output channels that are sliced away afterwards)."""
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0],) + tensor.shape[1:])])


def weights_stamp(models: Sequence[LoadedModel], **extra) -> dict:
    """What a build artifact (ONNX export, AOT package) depends on: each model's weights, hashed,
    plus the versions/settings in ``extra``. A load compares it with the artifact's saved stamp."""
    digest = {}
    for m in models:
        h = hashlib.sha256()
        for name, tensor in m.net.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest[m.name] = h.hexdigest()
    return {"models": digest, **extra}


def on_device(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``net`` on ``device`` without moving the shared loaded network (Module.to works in place):
    itself when it is already there, else a copy."""
    if next(net.parameters()).device == torch.device(device):
        return net
    return copy.deepcopy(net).to(device)


class Optimization(ABC):
    name: ClassVar[str]
    # the precision tier (multidet.quality.RULES): "exact" = fp32, the baseline's arithmetic up to float
    # reassociation; "reduced" = bf16/fp16/INT8, judged by its mAP drop and served by auto only if allowed
    tier: ClassVar[str] = "exact"
    # random weights: raw outputs within this fraction of the baseline's largest output (None: not compared)
    raw_tolerance: ClassVar[float | None] = 1e-3
    # whether ``auto`` may time it at load (no compilation from scratch at start-up)
    auto_candidate: ClassVar[bool] = False
    chooses: ClassVar[bool] = False  # picks among other optimizations at load (auto); gets the reduced-precision switch
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda", "mps")  # device types it runs on (``supports`` may narrow)
    # what ``build`` makes at MAR build time (None: nothing) and about how many minutes that takes on two
    # cores: ``make mar`` says both before it builds (from 1 minute on, the tests build it once, in a MAR)
    build_step: ClassVar[str | None] = None
    build_minutes: ClassVar[float] = 0.0
    # device type -> the optimization it is identical to there (e.g. compile_reduce_overhead on CPU is compile)
    same_as: ClassVar[dict[str, str]] = {}
    requires: ClassVar[str] = ""  # what it needs beyond the device type (said when it is refused)
    separable: ClassVar[bool] = False  # forward(x, [k]) runs model k alone (per-model timings make sense)

    @classmethod
    def fast_on(cls, device: torch.device) -> bool:
        """Whether ``device`` has the units for its arithmetic (False: emulated there, seconds a request, e.g. fp16 on
        a CPU without AMX-FP16): a fact of the hardware, read by ``auto`` (which leaves it out there) and the tests.
        Which of the others is fastest on a machine, ``auto`` measures there."""
        return True

    def __init__(
        self,
        models: Sequence[LoadedModel],
        device: torch.device,
        max_detections: int = 100,
        artifact_dir: Path | None = None,
    ):
        if not models:
            raise ValueError("an optimization needs at least one model")
        if len({m.architecture for m in models}) != 1:
            raise ValueError(
                f"an optimization runs models of one architecture, got {sorted({m.architecture for m in models})}: "
                "the Detector gives each architecture its own optimization"
            )
        self.models = list(models)
        self.device = torch.device(device)
        self.max_detections = max_detections
        self.artifact_dir = Path(artifact_dir) if artifact_dir is not None else None
        config = self.models[0].net.config
        self.max_detection_points = config.max_detection_points
        self.anchor_boxes = Anchors.from_config(config).boxes.to(self.device)

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        """Whether this optimization can run on ``device`` (checked before construction)."""
        return torch.device(device).type in cls.devices

    @classmethod
    def outdone(cls, models: Sequence[LoadedModel]) -> str | None:
        """Why another candidate always does this one's work for ``models`` with less (auto neither builds nor
        times it then); None: a candidate worth timing."""
        return None

    @classmethod
    def build(
        cls, models: Sequence[LoadedModel], artifact_dir: Path, context: BuildContext | None = None
    ) -> list[Path]:
        """Build-time work for this optimization (e.g. an ONNX export), written to ``artifact_dir`` and
        packed into the MAR by create_mar.py. Returns the files written; most optimizations need none."""
        return []

    def artifacts(self) -> Path:
        """Where this optimization's build files are: its artifact dir, else a per-optimization folder of the cache."""
        from ..artifacts import folder_of

        return folder_of(self.name, self.artifact_dir)

    @property
    def description(self) -> str:
        """What the response's "optimization" field reports."""
        return self.name

    @abstractmethod
    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        """Run the networks of the models at ``active`` indices on a normalised batch."""

    @torch.inference_mode()
    def detect(
        self, batch: Batch, active: Sequence[int] | None = None, thresholds: Thresholds = None
    ) -> dict[int, torch.Tensor]:
        """Per active model index: [B, max_det, 6] detections in network pixels. ``thresholds`` ([B], or
        per model index a [B] tensor) lets post-processing drop candidates that cannot reach the
        response (same answer, less work)."""
        active = range(len(self.models)) if active is None else active
        raw = self.forward(batch.tensor, active)
        per_model = thresholds if isinstance(thresholds, Mapping) else dict.fromkeys(raw, thresholds)
        return {k: self.select(k, out, batch, per_model.get(k)) for k, out in raw.items()}

    def select(self, k: int, raw: RawOutput, batch: Batch, thresholds: torch.Tensor | None = None) -> torch.Tensor:
        """Model ``k``'s raw outputs -> its [B, max_det, 6] detections (the shared top-k/NMS step)."""
        cls_out, box_out = raw
        return select_detections(
            [c.float() for c in cls_out],
            [b.float() for b in box_out],
            self.anchor_boxes,
            self.models[k].num_classes,
            batch.img_scale,
            batch.img_size,
            self.max_detections,
            self.max_detection_points,
            thresholds,
        )


OPTIMIZATIONS: dict[str, type[Optimization]] = {}


def register(cls: type[Optimization]) -> type[Optimization]:
    if cls.name in OPTIMIZATIONS:
        raise ValueError(f"optimization {cls.name!r} registered twice")
    OPTIMIZATIONS[cls.name] = cls
    return cls


def is_servable(cls: type[Optimization]) -> bool:
    """An optimization of the runtime (a model archive can serve it), not one a user of the registry added
    (the lab's measuring aid ``mock``)."""
    return cls.__module__.startswith(__package__ + ".")


def create_optimization(
    name: str,
    models: Sequence[LoadedModel],
    device: torch.device | str,
    max_detections: int = 100,
    artifact_dir: Path | None = None,
    allow_reduced: bool = False,
    threshold: float = SERVING_THRESHOLD,
) -> Optimization:
    device = torch.device(device)
    try:
        cls = OPTIMIZATIONS[name]
    except KeyError:
        raise ValueError(f"unknown optimization {name!r}; available: {sorted(OPTIMIZATIONS)}") from None
    if not cls.supports(device):
        need = f": it needs {cls.requires}" if cls.requires else ""
        raise ValueError(f"optimization {name!r} does not run on {device}{need}")
    if cls.chooses:  # judges its candidates' answers at the served threshold
        return cls(models, device, max_detections, artifact_dir, allow_reduced=allow_reduced, threshold=threshold)
    return cls(models, device, max_detections, artifact_dir)


def list_optimizations(
    device: torch.device | str | None = None,
    tier: str | None = None,
    servable: bool | None = None,
    auto_candidate: bool | None = None,
    distinct: bool = False,
) -> list[str]:
    """Registered optimization names with the given properties (None: any), in registration order, the way
    timm's ``list_models`` is queried. ``distinct`` (with a device) leaves out optimizations that are identical
    to another optimization on that device (``same_as``)."""
    dev = torch.device(device) if device is not None else None
    return [
        name
        for name, cls in OPTIMIZATIONS.items()
        if (dev is None or cls.supports(dev))
        and (tier is None or cls.tier == tier)
        and (servable is None or servable == is_servable(cls))
        and (auto_candidate is None or cls.auto_candidate == auto_candidate)
        and not (distinct and dev is not None and dev.type in cls.same_as)
    ]
