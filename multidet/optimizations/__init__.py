"""Optimizations, registered by name. Importing this package registers all of them: every module
in this folder is imported (adding an optimization = adding one file whose class is ``@register``-ed)."""

import importlib
import pkgutil

from .base import (
    OPTIMIZATIONS,
    BuildContext,
    CheckSet,
    LoadedModel,
    Optimization,
    architecture_groups,
    build_optimization,
    create_optimization,
    group_artifact_dir,
    list_optimizations,
    register,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "auto"):
        importlib.import_module(f"{__name__}.{_module}")
importlib.import_module(f"{__name__}.auto")  # last: it chooses among the others

__all__ = [
    "OPTIMIZATIONS",
    "BuildContext",
    "CheckSet",
    "SERVABLE",
    "LoadedModel",
    "Optimization",
    "architecture_groups",
    "build_optimization",
    "create_optimization",
    "group_artifact_dir",
    "list_optimizations",
    "register",
]

# every optimization of the runtime (a MAR can be built for each); the lab's measuring aids register later
SERVABLE = sorted(list_optimizations(servable=True))
