#!/usr/bin/env python
"""How a request's cost grows with the number of models: p50 in-process and over HTTP for sets of 1..16 models
made from the default set's first model, sharing all but their class nets, only their backbone, or nothing
(detlab.experiments.scaling).

    python scripts/run_scaling.py                                   # the full run (~40 min on 2 cores)
    python scripts/run_scaling.py --sizes 1,2 --optimizations baseline,grouped --requests 3 --no-http   # quick

Writes OUT/scaling_results.json, scaling_report.txt and scaling.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paths import MODEL_SET, OUTPUTS, PHOTOS, SERVING

from detlab.experiments import scaling
from multidet.modelset import read_model_set
from multidet.optimizations import OPTIMIZATIONS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-set", type=Path, default=MODEL_SET, help="whose first model the sets are made from")
    p.add_argument("--sizes", default="1,2,4,8,16")
    p.add_argument("--sharing", default=",".join(scaling.SHARING), help="kinds of set: " + ", ".join(scaling.SHARING))
    p.add_argument("--optimizations", default="baseline,grouped,onnxruntime,openvino")
    p.add_argument("--http-optimizations", default="auto", help="the optimizations also measured over HTTP")
    p.add_argument("--http-sizes", default="1,8", help="the set sizes measured over HTTP (a server each)")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--out", type=Path, default=OUTPUTS / "scaling")
    args = p.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")]
    paths = [x for x in args.optimizations.split(",") if x]
    kinds = [x for x in args.sharing.split(",") if x]
    unknown = [x for x in paths if x not in OPTIMIZATIONS] + [x for x in kinds if x not in scaling.SHARING]
    if unknown:
        p.error(f"unknown optimization(s) or kind(s) of set {unknown}")
    start = None
    if not args.no_http:

        def start(workdir, set_file, path):
            return SERVING.start(workdir, timeout=900, optimization=path, model_set=set_file)

    result = scaling.run(
        read_model_set(args.model_set),
        sizes,
        paths,
        PHOTOS,
        args.requests,
        http_paths=[x for x in args.http_optimizations.split(",") if x],
        start=start,
        kinds=kinds,
        http_sizes=[int(n) for n in args.http_sizes.split(",")],
    )
    result.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
