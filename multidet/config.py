"""Configuration as data: the three model specs and one Settings object read once and passed down."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .labels import AQUARIUM_CLASSES, COCO_CLASSES, VEHICLE_CLASSES

ARCHITECTURE = "efficientdet_d0"
IMAGE_SIZE = 512


@dataclass(frozen=True)
class ModelSpec:
    name: str
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("efficientdet_d0_coco", COCO_CLASSES),
        ModelSpec("efficientdet_d0_aquarium", AQUARIUM_CLASSES),
        ModelSpec("efficientdet_d0_vehicles", VEHICLE_CLASSES),
    )
}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_SPECS)


class ConfigError(ValueError):
    """A setting has a wrong type or value (raised at load time, never per request)."""


@dataclass(frozen=True)
class Settings:
    """Everything the data path needs to know; built from model-config.yaml or CLI flags."""

    optimization: str = "baseline"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threshold: float = 0.5  # default score threshold, per request overridable
    max_detections: int = 100  # per model and image, after NMS
    max_image_pixels: int = 40_000_000  # larger images are refused from their header
    checkpoint_dir: str = "checkpoints"  # relative to the model directory
    artifact_dir: str = "artifacts"  # build-time files of a path (ONNX), relative too
    models: tuple[str, ...] = field(default=MODEL_NAMES)
    warmup: bool = True
    allow_reduced: bool = False  # auto may serve a reduced-precision path (bf16/fp16/INT8)
    profile: bool = False  # read by TorchServe itself (ts.handler_utils.timer): ts_handler_* timing metrics

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be within 0..1, got {self.threshold}")
        if self.max_detections < 1:
            raise ConfigError(f"max_detections must be >= 1, got {self.max_detections}")
        if self.max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        unknown = [m for m in self.models if m not in MODEL_SPECS]
        if unknown or not self.models:
            raise ConfigError(f"models must be a non-empty subset of {list(MODEL_NAMES)}, got {list(self.models)}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> Settings:
        """Build from a dict (e.g. the ``handler:`` section of model-config.yaml); unknown keys are errors."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            default = getattr(cls, key) if key != "models" else MODEL_NAMES
            try:
                if key == "models":
                    kwargs[key] = tuple(raw.split(",")) if isinstance(raw, str) else tuple(raw)
                elif isinstance(default, bool):
                    kwargs[key] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
                else:
                    kwargs[key] = type(default)(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"setting {key}={raw!r}: {exc}") from exc
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["models"] = list(self.models)
        return out
