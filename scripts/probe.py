#!/usr/bin/env python
"""Health probes for containers and Kubernetes: the standard library and multidet.tsconfig only (no
torch, no requests import: a probe runs every few seconds), token-aware.

    python scripts/probe.py live     # the frontend answers /ping
    python scripts/probe.py ready    # /ping answers AND the model has a READY worker (loaded, warmed up)
                                     # AND the server is not draining (serve.py foreground got SIGTERM)

With FRONT=ray (the image serving the Ray Serve front: docker/entrypoint.sh), both ask Ray Serve's
OIP health routes instead (live: /v2/health/live; ready: /v2/health/ready and not draining), on
127.0.0.1:$RAY_PORT (8000).

Exit status 0 when the check holds, 1 otherwise (with one line saying why). Addresses come from
config.properties as seen from inside the container (loopback), ports from the same environment
variables as docker/entrypoint.sh (INFERENCE_PORT, MANAGEMENT_PORT); with token authorisation on,
the keys from key_file.json (TorchServe writes it in its working directory; KEY_FILE overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from multidet.tsconfig import bearer, read_properties

ROOT = Path(__file__).resolve().parent.parent


def address(props: dict[str, str], key: str, env: str) -> str:
    host = props[key].rsplit(":", 1)[0].replace("0.0.0.0", "127.0.0.1")
    port = os.environ.get(env) or props[key].rsplit(":", 1)[1]
    return f"{host}:{port}"


def get(url: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc).encode()


def draining() -> Path | None:
    """The drain marker while a foreground server drains after SIGTERM (serve.py / serve_ray.py foreground)."""
    drain_file = Path(os.environ.get("DRAIN_FILE", "/tmp/multidet-draining"))
    return drain_file if drain_file.exists() else None


def ray_probe(check: str, url: str, timeout: float) -> int:
    status, body = get(f"{url}/v2/health/{check}", {}, timeout)
    if status != 200:
        print(f"not {check}: {url}/v2/health/{check} answered {status or body.decode(errors='replace')}")
        return 1
    if check == "ready" and draining():
        print("not ready: draining")
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=("live", "ready"))
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--inference", help="inference URL (default: config.properties + INFERENCE_PORT)")
    p.add_argument("--management", help="management URL (default: config.properties + MANAGEMENT_PORT)")
    p.add_argument("--key-file", type=Path, default=Path(os.environ.get("KEY_FILE", ROOT / "key_file.json")))
    p.add_argument("--model", default="all")
    p.add_argument("--timeout", type=float, default=4)
    p.add_argument("--front", choices=("torchserve", "ray"), default=os.environ.get("FRONT", "torchserve"))
    args = p.parse_args(argv)
    if args.front == "ray":
        return ray_probe(args.check, f"http://127.0.0.1:{os.environ.get('RAY_PORT', '8000')}", args.timeout)
    props = read_properties(args.config)
    inference = args.inference or address(props, "inference_address", "INFERENCE_PORT")
    status, body = get(f"{inference}/ping", bearer(args.key_file, "inference"), args.timeout)
    if status != 200:
        print(f"not live: {inference}/ping answered {status or body.decode(errors='replace')}")
        return 1
    if args.check == "live":
        return 0
    drain_file = draining()
    if drain_file:  # scripts/serve.py foreground got SIGTERM: out of the load balancer first
        print(f"not ready: draining ({drain_file})")
        return 1
    management = args.management or address(props, "management_address", "MANAGEMENT_PORT")
    status, body = get(f"{management}/models/{args.model}", bearer(args.key_file, "management"), args.timeout)
    try:
        workers = json.loads(body)[0].get("workers", []) if status == 200 else []
    except (ValueError, LookupError, AttributeError):
        workers = []
    ready = [w for w in workers if w.get("status") == "READY"]
    if not ready:
        print(f"not ready: {args.model} has no READY worker ({status}: {body[:200].decode(errors='replace')})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
