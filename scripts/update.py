#!/usr/bin/env python
"""Replace the model set of a running TorchServe without losing a request (TorchServe's versioning).

    make serve-secure MODEL_API=1                 # token auth on, the management API's model calls on
    make update MODELS=my_models.yaml [OPT=auto]  # build the next version, switch to it, drop the old

Builds ``all-<version>.mar`` of the given set into the server's model store (version: the highest
registered + 1), registers it with its workers loaded and warmed up, makes it the default (new
requests go to it) and unregisters the old versions (their workers finish what they hold). The
management key comes from key_file.json (TorchServe writes it when token authorisation is on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import requests
from paths import MODEL_SET, ROOT, mar_options

from detlab.packaging import build_mar
from detlab.server import replace_model
from multidet.config import ConfigError
from multidet.optimizations import SERVABLE
from multidet.tsconfig import bearer, read_properties


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-set", type=Path, default=MODEL_SET)
    p.add_argument("--optimization", default="auto", choices=SERVABLE)
    p.add_argument("--model", default="all")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--management", help="default: config.properties' management_address")
    p.add_argument("--model-store", type=Path, help="the server's model store (default: config.properties')")
    p.add_argument("--key-file", type=Path, default=ROOT / "key_file.json")
    args = p.parse_args(argv)
    props = read_properties(args.config)
    management = args.management or props["management_address"]
    store = args.model_store or (ROOT / props["model_store"])
    headers = bearer(args.key_file, "management")
    try:
        versions = requests.get(f"{management}/models/{args.model}/all", headers=headers, timeout=30).json()
        current = max(float(v["modelVersion"]) for v in versions)
    except (requests.RequestException, ValueError, TypeError, KeyError) as exc:
        print(f"error: cannot read {args.model}'s versions from {management} ({exc})", file=sys.stderr)
        return 2
    version = f"{int(current) + 1}.0"
    try:
        options = mar_options(
            optimization=args.optimization,
            model_set=args.model_set,
            model_name=args.model,
            version=version,
            archive_name=f"{args.model}-{version}",
            workers=args.workers,
            batch_size=args.batch_size,
        )
        mar = build_mar(options, store, log=lambda line: print(line, flush=True))
        removed = replace_model(management, mar.name, version, args.model, headers, args.workers)
    except (ConfigError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model} {version} serves {args.model_set}; removed {removed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
