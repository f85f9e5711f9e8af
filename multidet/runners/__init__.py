"""Optimisation paths, registered by name. Importing this package registers all of them: every module
in this folder is imported (adding a path = adding one file whose class is ``@register``-ed)."""

import importlib
import pkgutil

from .base import (
    RUNNERS,
    BuildContext,
    LoadedModel,
    Runner,
    architecture_groups,
    build_path,
    create_runner,
    group_artifact_dir,
    list_runners,
    register,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "auto"):
        importlib.import_module(f"{__name__}.{_module}")
importlib.import_module(f"{__name__}.auto")  # last: it chooses among the others

__all__ = [
    "RUNNERS",
    "BuildContext",
    "SERVABLE",
    "LoadedModel",
    "Runner",
    "architecture_groups",
    "build_path",
    "create_runner",
    "group_artifact_dir",
    "list_runners",
    "register",
]

# every path a MAR can be built for (the mock lower bound is for benchmarks only)
SERVABLE = sorted(name for name, cls in RUNNERS.items() if not cls.benchmark_only)
