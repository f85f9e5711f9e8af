#!/usr/bin/env python
"""Sustained load with a mix of good and bad requests against a running server
(detlab.experiments.soak): failures by status, p50/p99 over time in alternating clean and mixed
windows, worker restarts and the worker's memory at start and end.

    python scripts/soak.py --duration 600                 # against config.properties' server
    python scripts/soak.py --duration 60 --inference http://127.0.0.1:8080 --management http://127.0.0.1:8081

Writes outputs/soak/soak_results.json, soak_report.txt and soak.png. Exit status 1 on any unexpected
status, a worker restart, or worker RSS growth above --max-rss-growth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paths import CONFIG, OUTPUTS, PHOTOS

from detlab.experiments import soak
from multidet.tsconfig import read_properties


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--window", type=float, default=30, help="seconds per reporting window")
    p.add_argument(
        "--warmup", type=float, default=20, help="seconds of the same load before the memory baseline (default 20)"
    )
    p.add_argument("--inference", default=None, help="default: config.properties' inference_address")
    p.add_argument("--management", default=None, help="default: config.properties' management_address")
    p.add_argument("--max-rss-growth", type=float, default=10.0, help="percent (default 10)")
    p.add_argument("--out", type=Path, default=OUTPUTS / "soak")
    args = p.parse_args(argv)
    if args.inference is None or args.management is None:
        props = read_properties(CONFIG)
        args.inference = args.inference or props["inference_address"]
        args.management = args.management or props["management_address"]
    result = soak.run(
        args.inference, args.management, args.duration, args.concurrency, args.window, args.warmup, PHOTOS
    )
    result.write(args.out)
    return 0 if result.ok(args.max_rss_growth) else 1


if __name__ == "__main__":
    sys.exit(main())
