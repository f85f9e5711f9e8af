#!/usr/bin/env python
"""HTTP latency and throughput under increasing load (detlab.experiments.sweep): Locust (the
load_tests package, real JPEGs, every response checked) against a real TorchServe at 1, 2, 4, 8 ...
concurrent users, with TorchServe's batching off and on; TorchServe's own queue and worker figures per
step, and the saturation point.

    python scripts/run_load_sweep.py                                  # 1,2,4,8 users x 30 s, batching off and on
    python scripts/run_load_sweep.py --users 1,2 --duration 5 --batching off     # quick (< 1 min)
    python scripts/run_load_sweep.py --url http://127.0.0.1:8080 --metrics-url http://127.0.0.1:8082

Writes outputs/sweep/sweep_results.json, sweep_report.txt, sweep.csv and sweep.png; exits 1 when any
request failed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from paths import MODEL_SET, OUTPUTS, PHOTOS, ROOT, SERVING

from detlab.experiments import sweep
from multidet.optimizations import SERVABLE


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="1,2,4,8", help="comma-separated concurrency levels")
    p.add_argument("--duration", type=int, default=30, help="seconds per step")
    p.add_argument("--batching", default="off,on", help="off, on or off,on")
    p.add_argument("--batch-size", type=int, default=4, help="TorchServe batchSize when batching is on")
    p.add_argument("--max-batch-delay", type=int, default=50, help="TorchServe maxBatchDelay (ms) when batching is on")
    p.add_argument("--optimization", default="auto", choices=SERVABLE)
    p.add_argument("--url", default=None, help="use this running server instead of starting one per configuration")
    p.add_argument("--metrics-url", default=None, help="its metrics endpoint (with --url)")
    p.add_argument("--warmup", type=int, default=4, help="untimed requests before the first step")
    p.add_argument("--model-set", type=Path, default=MODEL_SET)
    p.add_argument("--out", type=Path, default=OUTPUTS / "sweep")
    args = p.parse_args(argv)
    batching = [b.strip() for b in args.batching.split(",")]
    if not set(batching) <= {"off", "on"}:
        p.error("--batching takes off, on or off,on")
    result = sweep.run(
        replace(SERVING, model_set=args.model_set),
        ROOT / "load_tests",
        PHOTOS,
        users=[int(u) for u in args.users.split(",")],
        duration=args.duration,
        batching=batching,
        batch_size=args.batch_size,
        max_batch_delay=args.max_batch_delay,
        optimization=args.optimization,
        warmup=args.warmup,
        external=args.url,
        external_metrics=args.metrics_url,
    )
    result.write(args.out)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
