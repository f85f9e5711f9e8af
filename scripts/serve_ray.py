#!/usr/bin/env python
"""The model set on Ray Serve (multidet.ray_app): start a local Ray cluster (or join one), deploy, wait.

    python scripts/serve_ray.py start [--model-set models.yaml] [--optimization auto] [--set num_replicas=2 ...]
    python scripts/serve_ray.py start --dashboard              # with Ray's dashboard on 127.0.0.1:8265
    python scripts/serve_ray.py start --address HEAD:6379     # deploy onto a running cluster instead
    python scripts/serve_ray.py build --set artifact_dir=DIR   # only the build files (auto's check set, IR...)
    python scripts/serve_ray.py stop                           # Serve's applications, then the local cluster
    python scripts/serve_ray.py status
    python scripts/serve_ray.py foreground --bind 0.0.0.0      # containers (FRONT=ray): start, then wait
                                                               # for SIGTERM: drain, stop Serve and Ray

The local cluster runs with Ray's token authentication (``RAY_AUTH_MODE=token``; the token in ~/.ray/auth_token,
made on first start, or ``RAY_AUTH_TOKEN``): a Ray client, job or dashboard visit without it is refused (your
own Ray clients: ``RAY_AUTH_MODE=token`` in their environment, and they read the file).
``--set KEY=VALUE`` takes any field of ``multidet.ray_app.RayFront`` (replicas, num_cpus, threads, batching,
autoscaling, max_request_size) or of ``Settings`` (threshold, decode limits, ...). Routes: README "Ray Serve".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from paths import MODEL_SET, PHOTOS

BIN = Path(sys.executable).parent


def ray(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], check=check, text=True, capture_output=not check)


def connect(address: str | None) -> bool:
    """Connect this process to the cluster at ``address`` (None: the local one, if it runs). Through Ray's
    Python API, which reads the cluster's auth token (~/.ray/auth_token); False when no cluster answers."""
    import ray as ray_api

    try:
        ray_api.init(address=address or "auto", logging_level="WARNING")
    except ConnectionError:
        return False
    return True


def prebuild(front) -> None:
    """The optimization's build files where the replicas load them (``artifact_dir``, else this machine's cache),
    made here by the lab (auto's labelled check set, INT8's calibration images): a replica only loads them.
    On a cluster of several machines give ``artifact_dir`` a folder every node reads (or build it into the image)."""
    from detlab.build import build_for_serving
    from multidet.modelset import load_models, read_model_set

    models = load_models(read_model_set(front.model_set), front.settings.models or None)
    build_for_serving(
        front.settings.optimization,
        models,
        front.artifact_dir,
        front.settings.allow_reduced,
        PHOTOS,
        log=lambda line: print(line, flush=True),
    )


def front_args(opts) -> dict:
    """RayFront's flat args: the model set and optimization, then every setting given (flags or --set)."""
    from multidet.config import setting_values

    values = setting_values(opts)
    return {"model_set": str(Path(opts.model_set).resolve()), "optimization": opts.optimization, **values}


def head_args(opts) -> list[str]:
    """``ray start`` of the local cluster, with token authentication (``serving_environment``): a client needs the
    token (~/.ray/auth_token) to attach. The dashboard (and its Jobs API) only with ``--dashboard``, on loopback.
    Ray binds its GCS and raylet to every interface (it resolves a loopback node address to the host's own), so
    off Kubernetes the token is what closes them; on Kubernetes the network policy closes them too."""
    args = ["--head", "--disable-usage-stats", f"--port={opts.ray_port}"]
    if opts.dashboard:
        args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={opts.dashboard_port}"]
    else:
        args.append("--include-dashboard=false")
    return args + (["--num-cpus", str(opts.num_cpus)] if opts.num_cpus else [])


def start(opts) -> int:

    from multidet.ray_app import RayFront, deploy

    args = front_args(opts)
    front = RayFront.from_mapping(args)  # a wrong setting fails here, before any cluster starts
    prebuild(front)
    if not connect(opts.address):
        if opts.address is not None:
            raise SystemExit(f"no Ray cluster answers at {opts.address}")
        print("starting a local Ray cluster (ray start --head, token authentication) ...", flush=True)
        ray("start", *head_args(opts))
        if not connect(None):
            raise SystemExit("the local Ray cluster did not answer after ray start")
    print(f"deploying {front.settings.optimization} with {front.deployment_options()} ...", flush=True)
    url = deploy(args, opts.bind, opts.port, opts.timeout)
    print(f"ready: curl -T docs/example.jpg {url}/predictions/{front.name}   (OIP v2: {url}/v2/models/{front.name})")
    return 0


def foreground(opts) -> int:
    """A container's PID 1: a one-node cluster, the application, then on SIGTERM/SIGINT readiness off (the
    drain file probe.py reads), DRAIN_SECONDS more of serving, Serve's graceful shutdown (replicas finish
    what they hold), and the cluster stopped."""
    import os
    import signal
    import threading
    import time

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    drain_file = Path(os.environ.get("DRAIN_FILE", "/tmp/multidet-draining"))
    drain_file.unlink(missing_ok=True)
    start(opts)
    stopping.wait()
    drain_file.touch()
    print("draining: readiness off", flush=True)
    time.sleep(float(os.environ.get("DRAIN_SECONDS", "5")))
    from ray import serve

    serve.shutdown()
    ray("stop")
    drain_file.unlink(missing_ok=True)
    return 0


def build(opts) -> int:
    """Only the build files (``prebuild``), e.g. into an image: ``--set artifact_dir=/app/artifacts/ray``."""
    from multidet.ray_app import RayFront

    prebuild(RayFront.from_mapping(front_args(opts)))
    return 0


def stop(opts) -> int:
    """Serve's applications (replicas finish what they hold), then the local cluster (not a remote one)."""
    if connect(opts.address):
        from ray import serve

        serve.shutdown()
    else:
        print("no Ray cluster answers")
    if opts.address is None:
        ray("stop")  # the local Ray processes, also where a cluster did not answer
    return 0


def status(opts) -> int:
    if not connect(opts.address):
        print("no Ray cluster running")
        return 1
    from ray import serve

    apps = {name: app.status for name, app in serve.status().applications.items()}
    print(json.dumps(apps))
    return 0 if apps else 1


def parser() -> argparse.ArgumentParser:
    from multidet.config import Settings, add_setting_flags
    from multidet.ray_app import RayFront

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("start", "build", "stop", "status", "foreground"))
    p.add_argument("--model-set", default=str(MODEL_SET))
    p.add_argument("--optimization", default="auto")
    p.add_argument("--address", default=None, help="a running cluster (HEAD:6379); default: a local one")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs of the local cluster (default: all)")
    p.add_argument("--ray-port", type=int, default=6379, help="the local cluster's GCS port")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard on 127.0.0.1 (token needed)")
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--bind", default="127.0.0.1", help="Serve's HTTP address (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--timeout", type=float, default=900)
    # every setting of the runtime (Settings) and of the Ray front (RayFront) as a flag, derived from the types
    # (RayFront's num_cpus, a replica's share, is --set num_cpus=N: --num-cpus is the local cluster's)
    add_setting_flags(p, [Settings, RayFront])
    return p


def main(argv=None) -> int:
    p = parser()
    opts = p.parse_args(argv)
    if any("=" not in kv for kv in opts.set):
        p.error("--set takes KEY=VALUE")
    from multidet.ray_app import serving_environment

    serving_environment()  # before any Ray call of this process: token authentication, replicas' niceness
    commands = {"start": start, "build": build, "stop": stop, "status": status, "foreground": foreground}
    return commands[opts.command](opts)


if __name__ == "__main__":
    sys.exit(main())
