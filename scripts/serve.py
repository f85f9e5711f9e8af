#!/usr/bin/env python
"""Start/stop TorchServe with the repository's config.properties and wait until /predictions/all is ready.

    python scripts/serve.py start      # returns once /ping is healthy and the model's worker is READY
    python scripts/serve.py stop
    python scripts/serve.py status
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def healthy(inference: str) -> bool:
    try:
        return requests.get(f"{inference}/ping", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def ready_workers(management: str, model: str) -> int:
    try:
        info = requests.get(f"{management}/models/{model}", timeout=2).json()
        return sum(w.get("status") == "READY" for w in info[0].get("workers", []))
    except (requests.RequestException, ValueError, LookupError, AttributeError):
        return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--model", default="all")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the model to be ready")
    args = p.parse_args(argv)

    props = read_properties(args.config)
    inference, management = props["inference_address"], props["management_address"]
    if args.action == "stop":
        return subprocess.call(["torchserve", "--stop"], cwd=ROOT)
    if args.action == "status":
        up = healthy(inference)
        print(f"TorchServe at {inference}: {'healthy' if up else 'not running'}; "
              f"{ready_workers(management, args.model)} READY worker(s) for {args.model}")
        return 0 if up else 1

    if healthy(inference):
        print(f"TorchServe is already running at {inference} (run `make stop` first to serve a new build).")
        return 0
    cmd = ["torchserve", "--start", "--ncs", "--ts-config", str(args.config)]
    print("starting:", " ".join(cmd), flush=True)
    (ROOT / "logs").mkdir(exist_ok=True)
    with open(ROOT / "logs" / "torchserve.out", "ab") as out:
        # The Java frontend keeps its stdout: give it a file, so a caller piping our output isn't held open.
        rc = subprocess.call(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        print("torchserve failed to start; see logs/torchserve.out and logs/ts_log.log", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.timeout:
        if healthy(inference) and ready_workers(management, args.model) > 0:
            print(f"\nready in {time.monotonic() - t0:.0f} s. Try:\n"
                  f"  curl -T load_tests/images/coffee.jpg {inference}/predictions/{args.model}\n"
                  f"  curl -T load_tests/images/coffee.jpg -H 'X-Threshold: 0.3' {inference}/predictions/{args.model}")
            return 0
        print(".", end="", flush=True)
        time.sleep(2)
    print(f"\nnot ready after {args.timeout:.0f} s; see logs/model_log.log and logs/ts_log.log", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
