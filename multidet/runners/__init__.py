"""Optimisation paths, registered by name. Importing this package registers all of them."""
from .base import RUNNERS, LoadedModel, Runner, create_runner, register
from . import baseline  # noqa: F401  (registers "baseline")

__all__ = ["RUNNERS", "LoadedModel", "Runner", "create_runner", "register"]
