"""Optimisation paths, registered by name. Importing this package registers all of them."""
from .base import RUNNERS, LoadedModel, Runner, create_runner, register
from . import baseline, channels_last, grouped, half, vmap  # noqa: F401  (each module registers its path)

__all__ = ["RUNNERS", "LoadedModel", "Runner", "create_runner", "register"]
