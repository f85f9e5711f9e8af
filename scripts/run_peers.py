#!/usr/bin/env python
"""The project served end to end against the runtimes users would pick instead, side by side, in one
process, interleaved (detlab.experiments.peers): TorchServe over HTTP vs ONNX Runtime and OpenVINO
running the same networks alone. The JSON records the CPU model and its ISA flags; a PNG shows the p50s.

    python scripts/run_peers.py                          # auto, 40 requests per entry
    python scripts/run_peers.py --optimization openvino --requests 20

Writes outputs/peers/peers_results.json, peers_report.txt and peers.png.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from paths import MODEL_SET, OUTPUTS, PHOTOS, SERVING

from detlab.experiments import peers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimization", default="auto", help="the served optimization (default auto, as make serve)")
    p.add_argument("--allow-reduced", action="store_true", help="serve with handler.allow_reduced (auto)")
    p.add_argument("--requests", type=int, default=40, help="timed calls per entry")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-int8", action="store_true", help="skip the OpenVINO INT8 peer (NNCF takes minutes)")
    p.add_argument("--model-set", type=Path, default=MODEL_SET)
    p.add_argument("--out", type=Path, default=OUTPUTS / "peers")
    args = p.parse_args(argv)
    result = peers.run(
        replace(SERVING, model_set=args.model_set),
        PHOTOS,
        optimization=args.optimization,
        allow_reduced=args.allow_reduced,
        requests=args.requests,
        warmup=args.warmup,
        int8=not args.no_int8,
    )
    result.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
