"""TorchServe's config.properties format. Deliberately light (no torch import): health checks use it."""

from __future__ import annotations

from pathlib import Path


def read_properties(path: Path | str) -> dict[str, str]:
    """A config.properties as a dict (comments and blank lines skipped)."""
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props
