#!/usr/bin/env python
"""What serving costs on top of inference (detlab.experiments.overhead): the same photos through
the core package, the TorchServe handler in embedded mode and a real TorchServe over HTTP (started
here on free ports, stopped after), per optimization, in rotating rounds.

    python scripts/run_serving_overhead.py                          # baseline and auto, 24 requests each
    python scripts/run_serving_overhead.py --optimizations baseline --requests 4     # quick

Writes outputs/overhead/overhead_results.json and overhead_report.txt.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from paths import MODEL_SET, OUTPUTS, PHOTOS, SERVING

from detlab.experiments import overhead
from multidet.device import select_device
from multidet.optimizations import SERVABLE


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizations", default="baseline,auto", help="comma-separated optimizations")
    p.add_argument("--device", default="auto")
    p.add_argument("--requests", type=int, default=24, help="timed requests per mode and path")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--server-timeout", type=float, default=600, help="seconds to wait for TorchServe's worker")
    p.add_argument("--model-set", type=Path, default=MODEL_SET)
    p.add_argument("--out", type=Path, default=OUTPUTS / "overhead")
    args = p.parse_args(argv)
    names = args.optimizations.split(",")
    bad = [n for n in names if n not in SERVABLE]
    if bad:
        p.error(f"unknown path(s) {bad}; available: {SERVABLE}")
    result = overhead.run(
        replace(SERVING, model_set=args.model_set),
        names,
        select_device(args.device),
        PHOTOS,
        requests=args.requests,
        warmup=args.warmup,
        server_timeout=args.server_timeout,
    )
    result.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
