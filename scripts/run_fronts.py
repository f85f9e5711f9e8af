#!/usr/bin/env python
"""TorchServe and Ray Serve side by side in one run (detlab.experiments.fronts): one image's p50/p99
over HTTP on each front (and OIP v2 on Ray) against the in-process call, throughput at saturation for
TorchServe, Ray 1 replica x 2 threads and Ray 2 replicas x 1 thread, and a Ray replica's memory.

    python scripts/run_fronts.py                               # baseline, 24 requests per mode
    python scripts/run_fronts.py --optimization auto --requests 48 --saturation-requests 96

Writes outputs/fronts/fronts_results.json, fronts_report.txt and fronts.png.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from paths import MODEL_SET, OUTPUTS, PHOTOS, SERVING

from detlab.experiments import fronts
from multidet.optimizations import SERVABLE


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimization", default="baseline", choices=SERVABLE)
    p.add_argument("--requests", type=int, default=24, help="timed one-client requests per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients at saturation")
    p.add_argument("--saturation-requests", type=int, default=48, help="images per saturation run")
    p.add_argument("--batch", type=int, default=4, help="TorchServe batchSize and Ray max_batch_size")
    p.add_argument("--pause", type=float, default=0.2, help="seconds between timed calls (OpenMP threads go idle)")
    p.add_argument("--server-timeout", type=float, default=600)
    p.add_argument("--model-set", type=Path, default=MODEL_SET)
    p.add_argument("--out", type=Path, default=OUTPUTS / "fronts")
    args = p.parse_args(argv)
    result = fronts.run(
        replace(SERVING, model_set=args.model_set),
        PHOTOS,
        optimization=args.optimization,
        requests=args.requests,
        warmup=args.warmup,
        clients=args.clients,
        saturation_requests=args.saturation_requests,
        batch=args.batch,
        server_timeout=args.server_timeout,
        pause_s=args.pause,
    )
    result.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
