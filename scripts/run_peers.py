#!/usr/bin/env python
"""The project served end to end against the runtimes users would pick instead, side by side.

In ONE process and interleaved request by request (these machines are noisy; ratios are taken within
the run), on the same photos:

- served:   the project over HTTP: a real TorchServe serving ``--optimization`` (default auto, as
            `make serve`), one image per request, JPEG bytes in, JSON detections out (decode,
            letterbox, the three networks, top-k/NMS, JSON, TorchServe's frontend and IPC);
- baseline: the project's baseline path end to end in-process (eager PyTorch, decode to response);
- peers:    the same three trained networks run ALONE by each runtime, on an already letterboxed and
            normalised [1, 3, 512, 512] array, no pre/post-processing: ONNX Runtime with three
            sessions (one per network, graph optimisation "all", threads = cores), ONNX Runtime
            running the grouped graph, OpenVINO f32 (latency hint, threads = cores), OpenVINO bf16
            (only where the CPU has native bf16) and OpenVINO INT8 (NNCF, as ``openvino_int8`` builds it);
- ours:     the project's grouped super-model (the ``onnxruntime`` path's graph) alone on ONNX Runtime,
            no pre/post-processing: not a peer (users cannot run it without this project), it shows
            what serving adds on top of the networks.

Goal (issue 12): served p50 within 1.15x of the fastest exact peer (ONNX Runtime or OpenVINO f32);
with ``--allow-reduced`` also within 1.15x of the fastest reduced-precision peer. The JSON records the
CPU model and its ISA flags; a PNG shows the p50s.

    python scripts/run_peers.py                          # auto, 40 requests per entry
    python scripts/run_peers.py --optimization openvino --requests 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
from paths import CONFIG, MODEL_SET, PHOTOS, ROOT, mar_options

from multidet.bench import environment, photos, summarize, timed_predict, write_outputs
from multidet.config import Settings
from multidet.device import native_bf16
from multidet.modelset import load_models as load_set
from multidet.modelset import read_model_set
from multidet.pipeline import Detector
from multidet.runners import BuildContext, LoadedModel
from multidet.runners.auto import PAUSE_S  # between timed calls (runtimes' spinning threads)
from multidet.runners.onnx import export_onnx, export_per_model, per_model_paths, session
from multidet.runners.openvino import OpenVinoInt8Runner, OpenVinoRunner
from multidet.server import start_torchserve
from multidet.timing import interleaved


def load_models() -> list[LoadedModel]:
    """The default model set's models; the peers run one architecture's networks (a mixed set has several)."""
    models = load_set(read_model_set(MODEL_SET))
    if len({m.architecture for m in models}) != 1:
        raise SystemExit(f"{MODEL_SET}: peers compare the networks of one architecture; this set mixes several")
    return models


def peers(models: list[LoadedModel], work: Path, int8: bool) -> dict:
    """name -> (tier, callable running the three networks on one normalised array)."""
    import openvino as ov

    out = {}
    export_per_model(models, work)
    ort_sessions = [session(p, torch.device("cpu")) for p in per_model_paths(models, work)]
    out["onnxruntime (3 sessions)"] = ("exact", lambda x: [s.run(None, {"images": x}) for s in ort_sessions])
    grouped = session(export_onnx(models, work / "grouped.onnx"), torch.device("cpu"))
    # not a peer: the project's own fused graph (the onnxruntime path) alone, i.e. the served path minus
    # decode, letterbox, top-k/NMS, JSON and TorchServe
    out["ours: grouped graph on onnxruntime"] = ("ours", lambda x: grouped.run(None, {"images": x}))

    core = ov.Core()
    threads = torch.get_num_threads()

    def compiled(runner_cls, precision: str) -> list:
        xmls = runner_cls._xmls(models, work)
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision,
        }
        return [core.compile_model(str(x), "CPU", config) for x in xmls]

    OpenVinoRunner.build(models, work)
    ov_f32 = compiled(OpenVinoRunner, "f32")
    out["openvino f32"] = ("exact", lambda x: [c(x) for c in ov_f32])
    if native_bf16():
        ov_bf16 = compiled(OpenVinoRunner, "bf16")
        out["openvino bf16"] = ("reduced", lambda x: [c(x) for c in ov_bf16])
    if int8:
        OpenVinoInt8Runner.build(models, work, BuildContext(calibration_photos=PHOTOS))
        ov_int8 = compiled(OpenVinoInt8Runner, "f32")
        out["openvino int8"] = ("reduced", lambda x: [c(x) for c in ov_int8])
    return out


def plot(path: Path, rows: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    p50 = [rows[n]["p50"] for n in names]
    colours = [
        "#d62728" if n.startswith("served") else "#7f7f7f" if n.startswith("baseline") else "#1f77b4" for n in names
    ]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
    ax.barh(names, p50, color=colours)
    for i, v in enumerate(p50):
        ax.text(v, i, f" {v:.0f} ms", va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, max(p50) * 1.18)
    ax.set_xlabel("p50 ms per image; served: the whole request over HTTP, others: the three networks alone")
    ax.xaxis.label.set_fontsize(8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimization", default="auto", help="the served path (default auto, as make serve)")
    p.add_argument("--allow-reduced", action="store_true", help="serve with handler.allow_reduced (auto)")
    p.add_argument("--requests", type=int, default=40, help="timed calls per entry")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-int8", action="store_true", help="skip the OpenVINO INT8 peer (NNCF takes minutes)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "peers")
    args = p.parse_args(argv)

    images = photos(PHOTOS)
    bodies = list(images.values())
    models = load_models()
    baseline = Detector(models, Settings(), torch.device("cpu"))
    arrays = [np.ascontiguousarray(baseline.preprocessor.prepare_bytes([b], "cpu").tensor.numpy()) for b in bodies]

    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        t0 = time.perf_counter()
        print("building the peers' graphs (ONNX, OpenVINO IR" + ("" if args.no_int8 else ", INT8") + ")...", flush=True)
        runtimes = peers(models, Path(tmp) / "peers", not args.no_int8)
        print(
            f"peers ready in {time.perf_counter() - t0:.0f} s; starting TorchServe ({args.optimization})...", flush=True
        )
        mar = mar_options(optimization=args.optimization, allow_reduced=args.allow_reduced)
        with start_torchserve(Path(tmp) / "ts", mar, CONFIG, timeout=900) as server, requests.Session() as http:
            url = f"{server.inference}/predictions/all"
            served_as = http.put(url, data=bodies[0], timeout=300).json()["optimization"]
            print(
                f"TorchServe ready (build {server.build_s:.0f} s, start {server.startup_s:.0f} s), serving {served_as}",
                flush=True,
            )

            def via_http(i):
                r = http.put(url, data=bodies[i], timeout=300)
                r.raise_for_status()

            auto_log = [line for line in server.logs(tail=2000).splitlines() if "auto on " in line]
            if auto_log:
                print(auto_log[-1].split("auto on ", 1)[1], flush=True)
            entries = {
                f"served {served_as} (HTTP, end to end)": via_http,
                "baseline (in-process, end to end)": lambda i: timed_predict(baseline, bodies[i]),
            }
            tiers = {name: "served" for name in entries}
            for name, (tier, fn) in runtimes.items():
                entries[f"{name} (networks alone)"] = (lambda f: lambda i: f(arrays[i]))(fn)
                tiers[f"{name} (networks alone)"] = tier

            def progress(done: int, times: dict) -> None:
                if done % 10 == 0 or done == args.requests:
                    print(
                        f"{done}/{args.requests}: "
                        + ", ".join(f"{n.split(' (')[0]} {statistics.median(v):.0f}" for n, v in times.items()),
                        flush=True,
                    )

            calls = {name: (lambda i, fn=fn: fn(i % len(bodies))) for name, fn in entries.items()}
            names = list(entries)
            times = interleaved(calls, args.requests, warmup=args.warmup, pause_s=PAUSE_S, progress=progress).ms

    stats = {name: summarize(v) for name, v in times.items()}
    served_name = names[0]
    served = stats[served_name]["p50"]
    exact = {n: s["p50"] for n, s in stats.items() if tiers[n] == "exact"}
    reduced = {n: s["p50"] for n, s in stats.items() if tiers[n] == "reduced"}
    best_exact = min(exact, key=exact.get)
    ratios = {
        "served_vs_fastest_exact_peer": round(served / exact[best_exact], 3),
        "fastest_exact_peer": best_exact,
        "served_vs_baseline_end_to_end": round(served / stats[names[1]]["p50"], 3),
    }
    ours = [n for n in stats if tiers[n] == "ours"]
    if ours and served_as.endswith("onnxruntime"):
        ratios["served_vs_its_own_graph_alone"] = round(served / stats[ours[0]]["p50"], 3)
    if reduced:
        best_reduced = min(reduced, key=reduced.get)
        ratios.update(
            served_vs_fastest_reduced_peer=round(served / reduced[best_reduced], 3), fastest_reduced_peer=best_reduced
        )
    env = environment([torch.device("cpu")])
    results = {
        "environment": env,
        "served_as": served_as,
        "auto_log": auto_log[-1:],
        "allow_reduced": args.allow_reduced,
        "requests": args.requests,
        "latency_ms": stats,
        "tiers": tiers,
        "ratios": ratios,
    }
    lines = [
        f"Peers side by side, {env['date']}, {env['cpu']} ({env['cpu_cores']} cores; "
        f"ISA {', '.join(env['cpu_isa']) or 'baseline x86-64'}), {args.requests} interleaved calls each",
        "",
        f"{'entry':<58} {'tier':>7} {'p50':>8} {'p90':>8} {'mean':>8}  ratio to served",
    ]
    for n, s in stats.items():
        lines.append(
            f"{n:<58} {tiers[n]:>7} {s['p50']:>8.1f} {s['p90']:>8.1f} {s['mean']:>8.1f}  {served / s['p50']:.2f}x"
        )
    lines += [
        "",
        f"served / fastest exact peer ({best_exact}): {ratios['served_vs_fastest_exact_peer']:.2f}x (goal <= 1.15)",
    ]
    if reduced:
        lines.append(
            f"served / fastest reduced peer ({ratios['fastest_reduced_peer']}): "
            f"{ratios['served_vs_fastest_reduced_peer']:.2f}x (goal <= 1.15 when reduced is allowed)"
        )
    lines.append(f"served / baseline end to end: {ratios['served_vs_baseline_end_to_end']:.2f}x")
    if "served_vs_its_own_graph_alone" in ratios:
        lines.append(
            f"served / its own graph alone (what decode, letterbox, NMS, JSON, HTTP add): "
            f"{ratios['served_vs_its_own_graph_alone']:.2f}x"
        )
    write_outputs(args.out, "peers", results, "\n".join(lines) + "\n")
    plot(args.out / "peers.png", stats, f"{env['cpu']} ({', '.join(env['cpu_isa'])}), served as {served_as}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
