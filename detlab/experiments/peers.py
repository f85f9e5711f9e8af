"""The project served end to end against the runtimes users would pick instead, side by side.

In ONE process and interleaved request by request (these machines are noisy; ratios are taken within
the run), on the same photos:

- served:   the project over HTTP: a real TorchServe serving ``optimization`` (default auto, as
            `make serve`), one image per request, JPEG bytes in, JSON detections out (decode,
            letterbox, the networks, top-k/NMS, JSON, TorchServe's frontend and IPC);
- baseline: the project's baseline path end to end in-process (eager PyTorch, decode to response);
- peers:    the same trained networks run ALONE by each runtime, on an already letterboxed and
            normalised [1, 3, H, W] array, no pre/post-processing: ONNX Runtime with one session per
            network (graph optimization "all", threads = cores), OpenVINO f32 (latency hint,
            threads = cores), OpenVINO bf16 (only where the CPU has native bf16) and OpenVINO INT8
            (NNCF, as ``openvino_int8`` builds it);
- ours:     the project's graph of the set (the ``onnxruntime`` path's: shared parts once, own parts
            side by side) alone on ONNX Runtime, no pre/post-processing: not a peer (users cannot run it
            without this project), it shows what serving adds on top of the networks.

Goal (issue 12): served p50 within 1.15x of the fastest exact peer (ONNX Runtime or OpenVINO f32);
with ``allow_reduced`` also within 1.15x of the fastest reduced-precision peer.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests as http_client
import torch

from multidet.config import Settings
from multidet.device import native_bf16
from multidet.modelset import load_models as load_set
from multidet.modelset import read_model_set
from multidet.optimizations import LoadedModel
from multidet.optimizations.auto import PAUSE_S  # between timed calls (runtimes' spinning threads)
from multidet.optimizations.onnx import SET_FILE, per_model_files, per_model_paths, private, session, set_files
from multidet.optimizations.openvino import calibration_batches, to_ir
from multidet.pipeline import Detector
from multidet.timing import interleaved

from .. import build
from ..bench import environment, photos, summarize, timed_predict
from ..server import Serving
from . import Result, Say, say_flush


def load_models(model_set: Path) -> list[LoadedModel]:
    """The set's models; the peers run one architecture's networks (a mixed set has several)."""
    models = load_set(read_model_set(model_set))
    if len({m.architecture for m in models}) != 1:
        raise ValueError(f"{model_set}: peers compare the networks of one architecture; this set mixes several")
    return models


def peers(models: list[LoadedModel], work: Path, int8: bool, calibration_photos: Path) -> dict:
    """name -> (tier, callable running the set's networks on one normalised array)."""
    import openvino as ov

    out = {}
    per_model_files(models, work)  # the exports (and the IR below) from the build cache when made before
    ort_sessions = [session(p, torch.device("cpu")) for p in per_model_paths(models, work)]
    out[f"onnxruntime ({len(models)} sessions)"] = (
        "exact",
        lambda x: [s.run(None, {"images": x}) for s in ort_sessions],
    )
    set_files(models, work)
    grouped = session(work / SET_FILE[False], torch.device("cpu"))
    # not a peer: the project's own fused graph (the onnxruntime path) alone, i.e. the served optimization minus
    # decode, letterbox, top-k/NMS, JSON and TorchServe
    out["ours: the set's graph on onnxruntime"] = ("ours", lambda x: grouped.run(None, {"images": x}))

    core = ov.Core()
    threads = torch.get_num_threads()
    example = torch.zeros(1, 3, *models[0].net.config.image_size)

    def irs(kind: str, quantize: bool) -> list[Path]:
        """Each network alone as OpenVINO IR, as a user converts it (INT8: NNCF on its own training images, as
        ``openvino_int8`` calibrates); kept in ``work`` for the next run."""
        context = build.context(photos=calibration_photos)
        out = []
        for m, net in zip(models, private(models)):
            xml = work / f"peers_{kind}" / f"{m.name}.xml"
            if not xml.exists():
                to_ir(net, example, None, xml, calibration_batches(m, context) if quantize else None)
            out.append(xml)
        return out

    def compiled(xmls: list[Path], precision: str) -> list:
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision,
        }
        return [core.compile_model(str(x), "CPU", config) for x in xmls]

    f32 = irs("openvino", quantize=False)
    ov_f32 = compiled(f32, "f32")
    out["openvino f32"] = ("exact", lambda x: [c(x) for c in ov_f32])
    if native_bf16():
        ov_bf16 = compiled(f32, "bf16")
        out["openvino bf16"] = ("reduced", lambda x: [c(x) for c in ov_bf16])
    if int8:
        ov_int8 = compiled(irs("openvino_int8", quantize=True), "f32")
        out["openvino int8"] = ("reduced", lambda x: [c(x) for c in ov_int8])
    return out


def plot(path: Path, rows: dict[str, dict], title: str) -> Path:
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
    ax.set_xlabel("p50 ms per image; served: the whole request over HTTP, others: the networks alone")
    ax.xaxis.label.set_fontsize(8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class PeersResult(Result):
    stem = "peers"

    def report(self) -> str:
        data = self.data
        env, stats, tiers, ratios = data["environment"], data["latency_ms"], data["tiers"], data["ratios"]
        served = next(iter(stats.values()))["p50"]
        best_exact = ratios["fastest_exact_peer"]
        reduced = "fastest_reduced_peer" in ratios
        lines = [
            f"Peers side by side, {env['date']}, {env['cpu']} ({env['cpu_cores']} cores; "
            f"ISA {', '.join(env['cpu_isa']) or 'baseline x86-64'}), {data['requests']} interleaved calls each",
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
        return "\n".join(lines) + "\n"

    def plot(self, png: Path) -> Path:
        env = self.data["environment"]
        return plot(
            png,
            self.data["latency_ms"],
            f"{env['cpu']} ({', '.join(env['cpu_isa'])}), served as {self.data['served_as']}",
        )


def run(
    serving: Serving,
    photo_dir: Path,
    optimization: str = "auto",
    allow_reduced: bool = False,
    requests: int = 40,
    warmup: int = 3,
    int8: bool = True,
    say: Say = say_flush,
) -> PeersResult:
    """``serving``'s set served as ``optimization`` over HTTP against the peers running its networks alone."""
    images = photos(photo_dir)
    bodies = list(images.values())
    models = load_models(serving.model_set)
    baseline = Detector(models, Settings(), torch.device("cpu"))
    arrays = [np.ascontiguousarray(baseline.preprocessor.prepare_bytes([b], "cpu").tensor.numpy()) for b in bodies]

    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        t0 = time.perf_counter()
        say("building the peers' graphs (ONNX, OpenVINO IR" + (", INT8" if int8 else "") + ")...")
        runtimes = peers(models, Path(tmp) / "peers", int8, photo_dir)
        say(f"peers ready in {time.perf_counter() - t0:.0f} s; starting TorchServe ({optimization})...")
        with (
            serving.start(
                Path(tmp) / "ts", timeout=900, optimization=optimization, allow_reduced=allow_reduced
            ) as server,
            http_client.Session() as http,
        ):
            url = f"{server.inference}/predictions/all"
            served_as = http.put(url, data=bodies[0], timeout=300).json()["optimization"]
            say(f"TorchServe ready (build {server.build_s:.0f} s, start {server.startup_s:.0f} s), serving {served_as}")

            def via_http(i):
                r = http.put(url, data=bodies[i], timeout=300)
                r.raise_for_status()

            auto_log = [line for line in server.logs(tail=2000).splitlines() if "auto on " in line]
            if auto_log:
                say(auto_log[-1].split("auto on ", 1)[1])
            entries = {
                f"served {served_as} (HTTP, end to end)": via_http,
                "baseline (in-process, end to end)": lambda i: timed_predict(baseline, bodies[i]),
            }
            tiers = {name: "served" for name in entries}
            for name, (tier, fn) in runtimes.items():
                entries[f"{name} (networks alone)"] = (lambda f: lambda i: f(arrays[i]))(fn)
                tiers[f"{name} (networks alone)"] = tier

            def progress(done: int, times: dict) -> None:
                if done % 10 == 0 or done == requests:
                    say(
                        f"{done}/{requests}: "
                        + ", ".join(f"{n.split(' (')[0]} {statistics.median(v):.0f}" for n, v in times.items())
                    )

            calls = {name: (lambda i, fn=fn: fn(i % len(bodies))) for name, fn in entries.items()}
            names = list(entries)
            times = interleaved(calls, requests, warmup=warmup, pause_s=PAUSE_S, progress=progress).ms

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
        "allow_reduced": allow_reduced,
        "requests": requests,
        "latency_ms": stats,
        "tiers": tiers,
        "ratios": ratios,
    }
    return PeersResult(results)
