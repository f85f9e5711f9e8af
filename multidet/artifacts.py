"""Build files of an optimization (ONNX exports, OpenVINO IR, AOTInductor packages) and the one rule for them:
fresh when a JSON stamp of what they were built from (weights' hashes, versions, settings) matches
and every file is there; otherwise rebuilt once, at load, with one logged warning (never per request).

Where they live: the MAR's ``artifacts/`` (made at archive build), or, for an optimization built without an
artifact folder (a script, a test), ``cache_dir()/artifacts/<path>``, never the current directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$MULTIDET_CACHE_DIR``, else ``~/.cache/multidet``: caches that outlive a worker (OpenVINO's blobs)."""
    return Path(os.environ.get("MULTIDET_CACHE_DIR") or Path.home() / ".cache" / "multidet")


def default_dir(path_name: str) -> Path:
    return cache_dir() / "artifacts" / path_name


@dataclass(frozen=True)
class Artifact:
    files: Sequence[Path]  # what must exist
    stamp_file: Path
    stamp: dict  # what the files are built from

    def fresh(self) -> bool:
        try:
            recorded = json.loads(self.stamp_file.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return recorded == self.stamp and all(Path(f).exists() for f in self.files)

    def write_stamp(self) -> Path:
        self.stamp_file.parent.mkdir(parents=True, exist_ok=True)
        self.stamp_file.write_text(json.dumps(self.stamp, indent=2) + "\n")
        return self.stamp_file

    @property
    def paths(self) -> list[Path]:
        return [*map(Path, self.files), self.stamp_file]


def ensure(artifact: Artifact, build: Callable[[], object], path_name: str, verb: str = "building") -> list[Path]:
    """The artifact's files, rebuilt first (one warning) when missing or built from something else."""
    if not artifact.fresh():
        log.warning(
            "%s build files in %s missing or built from other weights/versions: %s now "
            "(build them at MAR build time with `make mar OPT=%s`)",
            path_name,
            artifact.stamp_file.parent,
            verb,
            path_name,
        )
        build()
        artifact.write_stamp()
    return artifact.paths
