"""Optimisation paths, registered by name. Importing this package registers all of them."""

from . import (  # noqa: F401  (each registers its path)
    aot,
    auto,  # noqa: F401  (last: it chooses among the others)
    baseline,
    channels_last,
    compiled,
    cuda_graphs,
    grouped,
    half,
    mock,
    onnx,
    vmap,
)
from .base import RUNNERS, LoadedModel, Runner, create_runner, list_runners, register

__all__ = ["RUNNERS", "SERVABLE", "LoadedModel", "Runner", "create_runner", "list_runners", "register"]

# every path a MAR can be built for (the mock lower bound is for benchmarks only)
SERVABLE = sorted(name for name, cls in RUNNERS.items() if not cls.benchmark_only)
