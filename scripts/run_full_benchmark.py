#!/usr/bin/env python
"""Per-device benchmark (detlab.experiments.benchmark): latency percentiles, throughput, and where
the time goes (decode, preprocess, each model's network and top-k/NMS), paths interleaved.

    python scripts/run_full_benchmark.py --mock                 # every available device (cpu, cuda, mps)
    python scripts/run_full_benchmark.py --mock --requests 8    # quick (< 1 min on a 2-core CPU)
    python scripts/run_full_benchmark.py --devices cpu --optimizations baseline,channels_last

``--mock`` adds the lower bound (the same I/O path, constant "nothing detected" outputs). Writes
outputs/benchmark/benchmark_results.json and benchmark_report.txt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from paths import MODEL_SET, OUTPUTS, PHOTOS

from detlab.bench import available_devices
from detlab.experiments import benchmark
from multidet.optimizations import OPTIMIZATIONS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="auto", help="comma-separated (cpu,cuda,mps); auto: every available one")
    p.add_argument("--optimizations", default="baseline", help="comma-separated optimizations (default baseline)")
    p.add_argument("--mock", action="store_true", help="also measure the mock lower bound, interleaved")
    p.add_argument("--requests", type=int, default=40, help="timed requests per configuration and device")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4, help="images per call for the batched throughput")
    p.add_argument(
        "--breakdown", type=int, default=None, help="requests for the per-model breakdown (default min(requests, 12))"
    )
    p.add_argument("--model-set", type=Path, default=MODEL_SET)
    p.add_argument("--out", type=Path, default=OUTPUTS / "benchmark")
    args = p.parse_args(argv)

    devices = available_devices() if args.devices == "auto" else [torch.device(d) for d in args.devices.split(",")]
    paths = args.optimizations.split(",") + (["mock"] if args.mock else [])
    unknown = [n for n in paths if n not in OPTIMIZATIONS]
    if unknown:
        p.error(f"unknown path(s) {unknown}; available: {sorted(OPTIMIZATIONS)}")
    result = benchmark.run(
        args.model_set,
        devices,
        paths,
        PHOTOS,
        requests=args.requests,
        warmup=args.warmup,
        batch_size=args.batch_size,
        breakdown_requests=args.breakdown,
    )
    result.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
