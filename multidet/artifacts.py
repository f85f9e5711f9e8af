"""Build files of an optimization (ONNX exports, OpenVINO IR, AOTInductor packages) and the one rule for them:
fresh when a JSON stamp of what they were built from (weights' hashes, versions, settings) matches
and every file is there; otherwise rebuilt once, at load, with one logged warning (never per request).

Where they live: the MAR's ``artifacts/`` (made at archive build), or, for an optimization built without an
artifact folder (a script, a test), ``cache_dir()/artifacts/<path>``, never the current directory.

The build cache (``reuse_or_build``): files that depend only on their stamp (ONNX exports, OpenVINO IR, the
INT8 quantisation) are kept once in ``cache_dir()/builds/<key of the stamp and file names>``, so a second
archive of the same weights and versions copies them instead of exporting or quantising again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$MULTIDET_CACHE_DIR``, else ``~/.cache/multidet``: caches that outlive a worker (the build cache,
    OpenVINO's compiled blobs). The tests point it at a folder of their own session."""
    return Path(os.environ.get("MULTIDET_CACHE_DIR") or Path.home() / ".cache" / "multidet")


def default_dir(path_name: str) -> Path:
    return cache_dir() / "artifacts" / path_name


def folder_of(optimization: str, artifact_dir: Path | str | None) -> Path:
    """Where ``optimization``'s build files are: the given folder (an archive's), else the cache's folder of that
    optimization. A build and a load given the same ``artifact_dir`` (or none) meet here."""
    return Path(artifact_dir) if artifact_dir is not None else default_dir(optimization)


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


def reuse_or_build(
    artifact: Artifact, build: Callable[[], object], say: Callable[[str], None] = log.info
) -> list[Path]:
    """The artifact's files: left as they are when fresh; else copied from the build cache when built
    before from the same stamp; else built, stamped and kept in the cache (a cache that cannot be written
    is only a warning: the next build builds again). Every file lies under the stamp's folder."""
    if artifact.fresh():
        return artifact.paths
    folder = artifact.stamp_file.parent
    names = [Path(p).relative_to(folder) for p in artifact.paths]
    key = hashlib.sha256(
        json.dumps({"stamp": artifact.stamp, "files": sorted(map(str, names))}, sort_keys=True).encode()
    ).hexdigest()[:24]
    kept = cache_dir() / "builds" / key
    if all((kept / n).is_file() for n in names):
        _copy(names, kept, folder)
        say(f"{folder.name}: built before for the same stamp, reused from {kept}")
        return artifact.paths
    build()
    artifact.write_stamp()
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=kept.parent, prefix=".new-"))
        try:
            _copy(names, folder, tmp)
            shutil.rmtree(kept, ignore_errors=True)
            os.replace(tmp, kept)  # whole or not at all: a concurrent reader never sees half a build
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        log.warning("could not keep the build of %s in %s: %s", folder, kept, exc)
    return artifact.paths


def _copy(names: Sequence[Path], source: Path, target: Path) -> None:
    for n in names:
        (target / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / n, target / n)
