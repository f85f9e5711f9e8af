#!/usr/bin/env python
"""How a request's cost grows with the number of models: p50 in-process and over HTTP for sets of
1..8 copies of the default set's models, per path (multidet.scaling).

    python scripts/run_scaling.py                                   # the full run (~20 min on 2 cores)
    python scripts/run_scaling.py --sizes 1,2 --paths baseline,grouped --requests 3 --no-http   # quick

Writes OUT/scaling_results.json, scaling_report.txt and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from paths import CONFIG, MODEL_SET, OUTPUTS, PHOTOS, mar_options

from multidet.bench import environment, photos, write_outputs
from multidet.modelset import load_models, read_model_set
from multidet.runners import RUNNERS
from multidet.scaling import ScalingResult, plot, report, run_http, run_in_process
from multidet.server import start_torchserve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-set", type=Path, default=MODEL_SET, help="whose models are cycled (default: models.yaml)")
    p.add_argument("--sizes", default="1,2,3,4,6,8")
    p.add_argument("--paths", default="baseline,channels_last,grouped,vmap_backbone,onnxruntime,onnxruntime_per_model")
    p.add_argument("--http-paths", default="baseline,onnxruntime", help="the paths also measured over HTTP")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--out", type=Path, default=OUTPUTS / "scaling")
    args = p.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")]
    paths = [x for x in args.paths.split(",") if x]
    unknown = [x for x in paths if x not in RUNNERS]
    if unknown:
        p.error(f"unknown path(s) {unknown}")
    model_set = read_model_set(args.model_set)
    base = load_models(model_set)
    bodies = list(photos(PHOTOS).values())
    result = ScalingResult(sizes, paths, args.requests, environment=environment())
    say = lambda line: print(line, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        result.in_process_p50 = run_in_process(base, sizes, paths, bodies, args.requests, Path(tmp), PHOTOS, say)
    if not args.no_http:

        def start(workdir, set_file, path):
            return start_torchserve(workdir, mar_options(optimization=path, model_set=set_file), CONFIG, timeout=900)

        http_paths = [x for x in args.http_paths.split(",") if x]
        result.http_p50 = run_http(model_set, sizes, http_paths, bodies, args.requests, start, say)
    write_outputs(args.out, "scaling", result.to_json(), report(result))
    plot(result, args.out / "scaling.png")
    print(json.dumps({"png": str(args.out / "scaling.png")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
