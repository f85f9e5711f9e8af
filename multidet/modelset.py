"""The model set: which detectors answer together, as data (one YAML file).

    models:
      - name: pets                        # [a-z0-9_]+, unique in the file
        architecture: efficientdet_d0     # any effdet config name (effdet.get_efficientdet_config)
        weights: pets.safetensors         # .safetensors or .pth/.pt/.tar: a bare effdet state_dict, or
                                          # effdet train.py's {state_dict, state_dict_ema} (EMA preferred)
        classes: [cat, dog, rabbit]       # or classes_file: one name a line; may be omitted when a
                                          # project metadata file (<weights stem>.json) lies beside
        threshold: 0.4                    # optional, per model; a request's threshold still wins
        sha256: ...                       # optional: the weights file's hash, checked at every load

Relative paths are relative to the file. ``read_model_set`` checks the file's form (names, keys,
architectures, files present); ``load_models`` reads every model's weights and checks what only the
weights can tell (integrity, code in a pickle, class count, every key and shape). Every error names
the file and the entry. Nothing here knows any particular model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from .config import NAME, ConfigError
from .sharing import hold_once
from .weights import INDEX_SUFFIX, CheckpointError, load_entry, sha256_file, sidecar

MODELS_FILE = "models.yaml"  # the file's name in a folder (a model archive, a checkpoints folder)
MAX_MODELS = 64
KEYS = {"name", "architecture", "weights", "classes", "classes_file", "threshold", "sha256"}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".tar", ".bin", ".ckpt", INDEX_SUFFIX)


class ModelSetError(ConfigError):
    """The model set file, or one of its entries, is wrong (the message names which)."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    architecture: str
    weights: Path  # absolute
    classes: tuple[str, ...] | None = None  # None: from the metadata beside the weights
    threshold: float | None = None
    sha256: str | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        """Its classes without loading the weights: the entry's, else the metadata's beside the weights."""
        if self.classes is not None:
            return self.classes
        try:
            classes = tuple((sidecar(self.weights) or {}).get("class_names") or ())
        except CheckpointError as exc:
            raise ModelSetError(f"{self.name}: {exc}") from None
        if not classes:
            raise ModelSetError(
                f"{self.name}: no class names: give classes (or classes_file) in its entry "
                f"(no project metadata beside {self.weights})"
            )
        return classes

    def to_mapping(self, relative_to: Path | None = None) -> dict:
        weights = self.weights
        if relative_to is not None:
            weights = Path(weights).relative_to(relative_to)
        out = {"name": self.name, "architecture": self.architecture, "weights": str(weights)}
        if self.classes is not None:
            out["classes"] = list(self.classes)
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out


@dataclass(frozen=True)
class ModelSet:
    entries: tuple[ModelEntry, ...]
    source: Path | None = None  # the file it was read from

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, name: str) -> ModelEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def select(self, names: Sequence[str] | None) -> ModelSet:
        """The entries named (in the file's order); None or empty: all of them."""
        if not names:
            return self
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ModelSetError(f"{self._where()}: no model named {unknown}; the set has {list(self.names)}")
        return ModelSet(tuple(e for e in self.entries if e.name in names), self.source)

    def write(self, path: Path) -> Path:
        """Write the set as a models file; weights are written relative to the file's folder."""
        path = Path(path)
        base = path.parent.resolve()
        entries = []
        for e in self.entries:
            try:
                entries.append(e.to_mapping(relative_to=base))
            except ValueError:  # outside the folder: absolute
                entries.append(e.to_mapping())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"models": entries}, sort_keys=False, allow_unicode=True))
        return path

    def _where(self) -> str:
        return str(self.source) if self.source else "model set"


def known_architectures() -> list[str]:
    from effdet.config.model_config import efficientdet_model_param_dict

    return sorted(efficientdet_model_param_dict)


def _error(source: Path, index: int, name: str | None, message: str) -> ModelSetError:
    entry = f"entry {index + 1}" + (f" ({name})" if name else "")
    return ModelSetError(f"{source}: {entry}: {message}")


def _classes(raw, source: Path, index: int, name: str, base: Path) -> tuple[str, ...] | None:
    classes, classes_file = raw.get("classes"), raw.get("classes_file")
    if classes is not None and classes_file is not None:
        raise _error(source, index, name, "give classes or classes_file, not both")
    if classes_file is not None:
        path = (base / str(classes_file)).resolve()
        if not path.is_file():
            raise _error(source, index, name, f"classes_file {path} not found")
        classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if classes is None:
        return None
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, (str, int, float)) and str(c).strip() for c in classes)
    ):
        raise _error(source, index, name, "classes must be a non-empty list of names")
    return tuple(str(c).strip() for c in classes)


def parse_model_set(data, source: Path, base: Path | None = None) -> ModelSet:
    """A model set from the parsed YAML ``data`` (relative paths against ``base``, default the file's folder)."""
    source = Path(source)
    base = Path(base) if base is not None else source.parent
    if not isinstance(data, Mapping) or set(data) != {"models"}:
        raise ModelSetError(f"{source}: expected one key, models: a list of entries")
    raw_entries = data["models"]
    if not isinstance(raw_entries, list) or not raw_entries:
        raise ModelSetError(f"{source}: models must be a non-empty list")
    if len(raw_entries) > MAX_MODELS:
        raise ModelSetError(f"{source}: {len(raw_entries)} models; at most {MAX_MODELS}")
    architectures = set(known_architectures())
    entries, seen = [], set()
    for i, raw in enumerate(raw_entries):
        if not isinstance(raw, Mapping):
            raise _error(source, i, None, "an entry is a mapping (name, architecture, weights, ...)")
        name = raw.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise _error(source, i, None, f"name {name!r} must match [a-z0-9_]+")
        unknown = sorted(set(raw) - KEYS)
        if unknown:
            raise _error(source, i, name, f"unknown key(s) {unknown}; known: {sorted(KEYS)}")
        if name in seen:
            raise _error(source, i, name, f"duplicate name {name!r}")
        seen.add(name)
        arch = raw.get("architecture")
        if arch not in architectures:
            close = [a for a in sorted(architectures) if str(arch) in a][:6]
            raise _error(
                source,
                i,
                name,
                f"unknown architecture {arch!r}"
                + (f" (did you mean one of {close}?)" if close else "")
                + "; any effdet config name, e.g. efficientdet_d0, tf_efficientdet_d1",
            )
        if not isinstance(raw.get("weights"), str):
            raise _error(source, i, name, "weights: the path of a .safetensors or .pth file is required")
        weights = (base / raw["weights"]).resolve()
        if not weights.is_file():
            raise _error(source, i, name, f"weights file {weights} not found")
        if weights.suffix.lower() not in WEIGHT_SUFFIXES:
            raise _error(source, i, name, f"weights {weights.name}: expected one of {WEIGHT_SUFFIXES}")
        threshold = raw.get("threshold")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
                raise _error(source, i, name, f"threshold {threshold!r} must be a number in [0, 1]")
            threshold = float(threshold)
        sha = raw.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise _error(source, i, name, "sha256 must be 64 lowercase hex digits")
        entries.append(
            ModelEntry(
                name=name,
                architecture=arch,
                weights=weights,
                classes=_classes(raw, source, i, name, base),
                threshold=threshold,
                sha256=sha,
            )
        )
    return ModelSet(tuple(entries), source)


def read_model_set(path: Path | str) -> ModelSet:
    """Read and check a models file (or the ``models.yaml`` in a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODELS_FILE
    if not path.is_file():
        raise ModelSetError(f"model set file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ModelSetError(f"{path} is not valid YAML: {exc}") from exc
    return parse_model_set(data, path)


def load_models(model_set: ModelSet, names: Iterable[str] | None = None) -> list:
    """Every entry's weights read, verified and loaded: a ``LoadedModel`` per entry, in the file's order; equal
    tensors of different models are one tensor (``sharing.hold_once``)."""
    out = []
    for entry in model_set.select(list(names) if names else None):
        try:
            out.append(load_entry(entry))
        except CheckpointError as exc:
            raise ModelSetError(f"{model_set._where()}: {entry.name}: {exc}") from exc
    hold_once([m.net for m in out])  # a tensor equal in several models is held once
    return out


def pinned(model_set: ModelSet, models: Sequence) -> ModelSet:
    """The set with each entry's classes and sha256 written out (what a model archive ships)."""
    by_name = {m.name: m for m in models}
    return ModelSet(
        tuple(
            replace(e, classes=tuple(by_name[e.name].class_names), sha256=e.sha256 or sha256_file(e.weights))
            for e in model_set.entries
            if e.name in by_name
        ),
        model_set.source,
    )
