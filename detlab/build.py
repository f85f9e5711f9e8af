"""What the runtime's build steps need from the lab: ``auto``'s labelled check set and INT8's calibration
images, handed in through ``BuildContext`` (the runtime makes no data of its own), and the one call that
builds an optimization for a model set the way its server will load it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from multidet.artifacts import folder_of
from multidet.optimizations import BuildContext, LoadedModel, build_optimization

from .synthetic import DataSpec, calibration_images, check_set


def context(
    allow_reduced: bool = False, photos: Path | None = None, log: Callable[[str], None] = print
) -> BuildContext:
    """A build context whose check set is made by ``synthetic.check_set`` (every model's objects annotated) and
    whose INT8 calibration images are each model's own training split, backgrounds cut from ``photos`` (the
    folder ``make dataset`` used: without it INT8 refuses, since other images would quantise for other
    statistics than the ones served)."""

    def labelled(models: Sequence[LoadedModel], count: int, seed: int):
        return check_set(count, seed, [DataSpec.of(m) for m in models])

    def calibration(model: LoadedModel, count: int, seed: int):
        if photos is None or not any(Path(photos).glob("*.jpg")):
            raise RuntimeError(
                f"INT8 calibration needs the training data's background photos (*.jpg): none in {photos} "
                "(create_mar.py passes load_tests/images)"
            )
        return calibration_images(DataSpec.of(model), count, seed, Path(photos))

    return BuildContext(allow_reduced, labelled, calibration, log)


def build_for_serving(
    optimization: str,
    models: Sequence[LoadedModel],
    artifact_dir: Path | str | None,
    allow_reduced: bool = False,
    photos: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """``optimization``'s build files for ``models`` where a Detector given ``artifact_dir`` loads them (None:
    the cache's folder of the optimization, as for a Ray replica without an artifact folder)."""
    target = folder_of(optimization, artifact_dir)
    return build_optimization(optimization, models, target, context(allow_reduced, photos, log))
