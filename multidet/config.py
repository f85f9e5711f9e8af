"""Settings: one object read once (model-config.yaml's ``handler:`` section or CLI flags) and passed down.

Which models answer is data too: the model set file (multidet.modelset), named by ``model_set``."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

NAME = re.compile(r"^[a-z0-9_]+$")  # a model's name (the model set file, Settings.models)


@dataclass(frozen=True)
class DecodeLimits:
    """What one image may cost the decoder (multidet.decode); each is a setting of the same name."""

    max_image_pixels: int = 40_000_000  # width x height, from the header; larger: 413
    max_jpeg_scans: int = 100  # progressive JPEGs have ~10; each scan is a pass over the image; more: 422
    max_gif_blocks: int = 4096  # extension sub-blocks before the first frame (comments, XMP: ~1 MB); more: 422
    max_rle_pixels: int = 4_000_000  # run-length BMP: Pillow decodes it in Python (~0.4 us a pixel); larger: 413


class ConfigError(ValueError):
    """A setting has a wrong type or value (raised at load time, never per request)."""


@dataclass(frozen=True)
class Settings:
    """Everything the data path needs to know; built from model-config.yaml or CLI flags."""

    optimization: str = "baseline"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threshold: float = 0.5  # default score threshold, per request overridable
    max_detections: int = 100  # per model and image, after NMS
    # what one image may cost the decoder (DecodeLimits: the defaults and what each bounds)
    max_image_pixels: int = DecodeLimits.max_image_pixels
    max_jpeg_scans: int = DecodeLimits.max_jpeg_scans
    max_gif_blocks: int = DecodeLimits.max_gif_blocks
    max_rle_pixels: int = DecodeLimits.max_rle_pixels
    # > 0: each image is decoded in a child process within this many seconds (else 422) and that child
    # within decode_memory_mib of address space (else 413): multidet.isolation. 0: in-process, no bound
    decode_deadline_s: float = 10.0
    decode_memory_mib: int = 1024
    max_instances: int = 16  # images in one request (KServe v1 instances); more: 413
    max_request_pixels: int = 80_000_000  # pixels of all of one request's images together; more: 413
    model_set: str = "models.yaml"  # the model set file, relative to the model directory
    artifact_dir: str = "artifacts"  # build-time files of an optimization (ONNX), relative too
    models: tuple[str, ...] = ()  # a subset of the set's names, in any order (empty: all of them)
    warmup: bool = True
    hold_memory: bool = True  # keep freed tensors' memory for the next request (glibc: device.hold_freed_memory)
    allow_reduced: bool = False  # auto may serve a reduced-precision optimization (bf16/fp16/INT8)
    log_format: str = "text"  # text | json (one JSON object a line); either way with the request ids (tracing)
    profile: bool = False  # read by TorchServe itself (ts.handler_utils.timer): ts_handler_* timing metrics

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be within 0..1, got {self.threshold}")
        if self.max_detections < 1:
            raise ConfigError(f"max_detections must be >= 1, got {self.max_detections}")
        if self.decode_deadline_s < 0 or self.decode_memory_mib < 64:
            raise ConfigError(
                f"decode_deadline_s must be >= 0 and decode_memory_mib >= 64, got {self.decode_deadline_s}, "
                f"{self.decode_memory_mib}"
            )
        if self.max_instances < 1:
            raise ConfigError(f"max_instances must be >= 1, got {self.max_instances}")
        for key in [f.name for f in fields(DecodeLimits)] + ["max_request_pixels"]:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}")
        bad = [m for m in self.models if not isinstance(m, str) or not NAME.match(m)]
        if bad or len(set(self.models)) != len(self.models):
            raise ConfigError(f"models must be distinct model names ([a-z0-9_]+), got {list(self.models)}")

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
            default = getattr(cls, key)
            try:
                if key == "models":
                    items = raw.split(",") if isinstance(raw, str) else list(raw or ())
                    kwargs[key] = tuple(str(m).strip() for m in items if str(m).strip())
                elif isinstance(default, bool):
                    kwargs[key] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
                else:
                    kwargs[key] = type(default)(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"setting {key}={raw!r}: {exc}") from exc
        return cls(**kwargs)

    @cached_property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(**{f.name: getattr(self, f.name) for f in fields(DecodeLimits)})

    def to_mapping(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["models"] = list(self.models)
        return out


SETTING = "setting__"  # the argparse dest prefix of a flag derived from a settings type


def add_setting_flags(parser: argparse.ArgumentParser, types: Iterable[type], skip: Iterable[str] = ()) -> None:
    """Command-line flags derived from settings types (``Settings``, a front's own): ``--key-name VALUE`` for
    every field not in ``skip`` nor already a flag of ``parser``, and ``--set KEY=VALUE`` for any field. A flag
    left out stays unset (the type's default applies); ``setting_values`` collects what was given, for the
    types' ``from_mapping`` (which converts and checks every value the same way as model-config.yaml's)."""
    taken = {a.dest for a in parser._actions} | set(skip)
    group = parser.add_argument_group("settings (any of them also as --set KEY=VALUE)")
    for t in types:
        for f in fields(t):
            if f.name in taken or f.name == "settings":
                continue
            taken.add(f.name)
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            dest = SETTING + f.name
            if isinstance(default, bool):
                group.add_argument(
                    flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=f"default {default}"
                )
            else:
                group.add_argument(flag, dest=dest, default=None, metavar=f.name.upper(), help=f"default {default!r}")
    if "set" not in taken:
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting by its name")


def setting_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (flags, then ``--set`` pairs, which win), by field name."""
    values = {k[len(SETTING) :]: v for k, v in vars(args).items() if k.startswith(SETTING) and v is not None}
    for pair in getattr(args, "set", None) or []:
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConfigError(f"--set takes KEY=VALUE, got {pair!r}")
        values[key.strip()] = value
    return values
