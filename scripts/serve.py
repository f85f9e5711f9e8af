#!/usr/bin/env python
"""Start/stop TorchServe with the repository's config.properties and wait until /predictions/all is ready.

    python scripts/serve.py start            # returns once /ping is healthy and the model's worker is READY
    python scripts/serve.py start --secure   # the same with TorchServe's token authorisation on
    python scripts/serve.py stop
    python scripts/serve.py status
    python scripts/serve.py foreground --bind 0.0.0.0   # containers: TorchServe in the foreground (exec)

With --secure, TorchServe writes key_file.json (git-ignored) in the repository root; every call,
/ping included, then needs ``-H "Authorization: Bearer <key>"`` (the "inference" key for 8080, the
"management" key for 8081). Keys expire after token_expiration_min (60 by default).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from paths import ROOT

from detlab import server
from multidet.tsconfig import ADDRESS_KEYS, EXPOSED, PORT_KEYS, bearer, derived, read_properties, write_properties


def auth(kind: str) -> dict:
    """The bearer header for ``kind`` (inference/management) when token authorisation is on."""
    return bearer(ROOT / "key_file.json", kind)


def healthy(inference: str) -> bool:
    return server.healthy(inference, auth("inference"), timeout=2)


def ready_workers(management: str, model: str) -> int:
    return len(server.ready_workers(management, model, auth("management"), timeout=2))


def foreground(config: Path, drain_seconds: float, drain_timeout: float = 50) -> int:
    """TorchServe as a child of this process (a container's PID 1, which gets no default signal actions:
    an exec'd launcher without a handler ignored SIGTERM until the grace period's SIGKILL cut requests).

    On SIGTERM/SIGINT it drains: readiness goes off first (the drain file ``probe.py ready`` checks), so
    load balancers stop sending; it keeps serving for ``drain_seconds``, then waits until nothing is in
    flight (TorchServe's queue empty and no worker inside the handler: detlab.server.wait_idle), at
    most ``drain_timeout`` s, and only then stops the frontend (which resets
    the connections it still holds). Returns TorchServe's exit status."""
    import signal
    import tempfile

    import psutil

    drain_file = Path(os.environ.get("DRAIN_FILE", "/tmp/multidet-draining"))
    drain_file.unlink(missing_ok=True)
    busy = Path(tempfile.mkdtemp(prefix="multidet-busy-"))  # this server's own handlers' markers
    env = dict(os.environ, MULTIDET_BUSY_DIR=str(busy))
    cmd = ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", str(config)]
    child = subprocess.Popen(cmd, env=env)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    while child.poll() is None and not stop:
        time.sleep(0.2)
    if stop:
        drain_file.write_text(f"draining since {time.time():.0f}\n")
        print(f"signal {stop[0]}: readiness off ({drain_file}); serving {drain_seconds:.0f} s more", flush=True)
        t0 = time.monotonic()
        while child.poll() is None and time.monotonic() - t0 < drain_seconds:
            time.sleep(0.2)
        props = read_properties(config)
        management = props["management_address"].replace("0.0.0.0", "127.0.0.1")
        idle = server.wait_idle(management, "all", None, busy, auth("management"), drain_timeout)
        if child.poll() is None:
            print(f"stopping TorchServe ({'idle' if idle else 'drain timeout'})", flush=True)
            for proc in psutil.Process(child.pid).children():  # the Java frontend
                proc.terminate()
        child.wait()
    drain_file.unlink(missing_ok=True)
    return child.returncode or 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status", "foreground"])
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--model", default="all")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the model to be ready")
    p.add_argument("--secure", action="store_true", help="start with token authorisation on")
    p.add_argument(
        "--model-api",
        action="store_true",
        help="with --secure: the management API's model calls on (register/unregister: scripts/update.py)",
    )
    p.add_argument(
        "--bind",
        default=None,
        metavar="ADDR",
        help="listen on ADDR instead of 127.0.0.1 (e.g. 0.0.0.0 inside a container)",
    )
    p.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="NAME=PORT",
        help=f"override a port ({', '.join(PORT_KEYS)}), e.g. --port inference=9080",
    )
    p.add_argument("--model-store", default=None, help="override config.properties' model_store")
    p.add_argument(
        "--expose",
        default=",".join(EXPOSED),
        help="with --bind: the APIs that listen on ADDR (default %(default)s; the others stay on loopback: "
        f"{', '.join(a for a in ADDRESS_KEYS if a not in EXPOSED)})",
    )
    p.add_argument(
        "--write-config",
        type=Path,
        default=None,
        help="foreground: where to write the generated config (default logs/config.generated.properties)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=float(os.environ.get("DRAIN_SECONDS", 5)),
        help="foreground: after SIGTERM, seconds of serving with readiness off before TorchServe stops "
        "(default $DRAIN_SECONDS or 5)",
    )
    args = p.parse_args(argv)

    props = read_properties(args.config)
    try:
        ports = {k: int(v) for k, v in (item.split("=", 1) for item in args.port)}
        assert set(ports) <= set(PORT_KEYS)
    except (ValueError, AssertionError):
        p.error(f"--port takes NAME=PORT with NAME in {list(PORT_KEYS)}")
    if args.model_api and not args.secure:
        p.error("--model-api needs --secure: registering models is only opened with token authorisation on")
    expose = tuple(a.strip() for a in args.expose.split(",") if a.strip())
    if set(expose) - set(ADDRESS_KEYS):
        p.error(f"--expose takes a comma-separated list of {list(ADDRESS_KEYS)}")
    if args.action == "foreground":
        config = write_properties(
            derived(props, args.secure, args.bind, ports, args.model_store, expose),
            args.write_config or ROOT / "logs" / "config.generated.properties",
        )
        print(f"TorchServe in the foreground with {config}", flush=True)
        return foreground(config, args.drain_seconds)
    inference, management = props["inference_address"], props["management_address"]
    if args.action == "stop":
        rc = subprocess.call(["torchserve", "--stop"], cwd=ROOT)
        (ROOT / "key_file.json").unlink(missing_ok=True)
        return rc
    if args.action == "status":
        # ready = /ping healthy AND a loaded worker: TorchServe's /ping alone turns healthy while
        # the worker is still loading (seen with 0.12), so probes and scripts use this instead
        up, ready = healthy(inference), ready_workers(management, args.model)
        print(
            f"TorchServe at {inference}: {'healthy' if up else 'not running'}; {ready} READY worker(s) for {args.model}"
        )
        return 0 if up and ready > 0 else 1

    if healthy(inference):
        print(f"TorchServe is already running at {inference} (run `make stop` first to serve a new build).")
        return 0
    (ROOT / "logs").mkdir(exist_ok=True)
    config = args.config
    (ROOT / "key_file.json").unlink(missing_ok=True)  # stale keys from an earlier secure run
    if args.secure or args.bind or ports or args.model_store:
        props = derived(props, args.secure, args.bind, ports, args.model_store, expose)
        if args.model_api:
            props["enable_model_api"] = "true"
        inference, management = (
            props["inference_address"].replace("0.0.0.0", "127.0.0.1"),
            props["management_address"].replace("0.0.0.0", "127.0.0.1"),
        )
        config = write_properties(props, ROOT / "logs" / "config.generated.properties")
    cmd = ["torchserve", "--start", "--ncs", "--ts-config", str(config)]
    print("starting:", " ".join(cmd), flush=True)
    with open(ROOT / "logs" / "torchserve.out", "ab") as out:
        # The Java frontend keeps its stdout: give it a file, so a caller piping our output isn't held open.
        rc = subprocess.call(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        print("torchserve failed to start; see logs/torchserve.out and logs/ts_log.log", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.timeout:
        if healthy(inference) and ready_workers(management, args.model) > 0:
            token = auth("inference")
            extra = f" -H '{next(iter(token))}: {next(iter(token.values()))}'" if token else ""
            print(
                f"\nready in {time.monotonic() - t0:.0f} s. Try:\n"
                f"  curl -T docs/example.jpg{extra} {inference}/predictions/{args.model}\n"
                f"  curl -T load_tests/images/coffee.jpg{extra} -H 'X-Threshold: 0.3' "
                f"{inference}/predictions/{args.model}"
            )
            if token:
                print("token authorisation is on: keys in key_file.json (inference for 8080, management for 8081)")
            return 0
        print(".", end="", flush=True)
        time.sleep(2)
    print(f"\nnot ready after {args.timeout:.0f} s; see logs/model_log.log and logs/ts_log.log", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
