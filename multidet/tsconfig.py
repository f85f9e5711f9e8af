"""TorchServe's config.properties format and the busy markers its handlers leave. Deliberately light (no torch
import): health checks use it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FILE_KEYS = ("metrics_config",)  # paths in the file: relative to the file's folder, made absolute when read


def read_properties(path: Path | str) -> dict[str, str]:
    """A config.properties as a dict (comments and blank lines skipped); FILE_KEYS' paths absolute."""
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    for key in FILE_KEYS:
        if key in props:
            props[key] = str((Path(path).resolve().parent / props[key]).resolve())
    return props


PORT_KEYS = {
    "inference": "inference_address",
    "management": "management_address",
    "metrics": "metrics_address",
    "grpc_inference": "grpc_inference_port",
    "grpc_management": "grpc_management_port",
}


# the APIs that listen on ``bind`` unless told otherwise: the control APIs (management, gRPC
# management) stay on loopback, where only the pod itself (probes, `make update`) reaches them
EXPOSED = ("inference", "metrics")
ADDRESS_KEYS = {
    "inference": "inference_address",
    "management": "management_address",
    "metrics": "metrics_address",
    "grpc_inference": "grpc_inference_address",
    "grpc_management": "grpc_management_address",
}


def derived(
    props: dict[str, str],
    secure: bool = False,
    bind: str | None = None,
    ports: dict[str, int] | None = None,
    model_store: str | None = None,
    expose: tuple[str, ...] = EXPOSED,
) -> dict[str, str]:
    """The one derivation of TorchServe settings from config.properties (``make serve``, containers,
    the tests' servers): token authorisation on, another listen address for the ``expose``d APIs (the
    others keep the file's loopback), other ports or another model store; everything else as in the file."""
    unknown = set(expose) - set(ADDRESS_KEYS)
    if unknown:
        raise ValueError(f"expose: unknown API(s) {sorted(unknown)}; known: {list(ADDRESS_KEYS)}")
    out = dict(props)
    if secure:
        out["disable_token_authorization"] = "false"
    if bind:
        for name in expose:
            key = ADDRESS_KEYS[name]
            out[key] = bind if key.startswith("grpc") else out[key].replace("127.0.0.1", bind)
    for name, port in (ports or {}).items():
        key = PORT_KEYS[name]
        out[key] = str(port) if key.startswith("grpc") else f"{out[key].rsplit(':', 1)[0]}:{port}"
    if model_store:
        out["model_store"] = str(model_store)
    return out


def bearer(key_file: Path | str, kind: str) -> dict[str, str]:
    """The Authorization header for ``kind`` (inference/management) from TorchServe's key_file.json, or {}
    when there is none (token authorisation off)."""
    import json

    try:
        return {"Authorization": f"Bearer {json.loads(Path(key_file).read_text())[kind]['key']}"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_properties(props: dict[str, str], path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# generated from config.properties\n" + "".join(f"{k}={v}\n" for k, v in props.items()))
    return path


def busy_dir() -> Path:
    """Where handlers mark a worker inside the handler (``<model>-<version>-<pid>``): $MULTIDET_BUSY_DIR,
    else ``<tmp>/multidet-busy`` (TorchServe's temp folder, shared by the server's processes)."""
    return Path(os.environ.get("MULTIDET_BUSY_DIR") or Path(tempfile.gettempdir()) / "multidet-busy")
