"""Per-device benchmark of optimizations (and the mock lower bound): latency percentiles,
throughput (one image per call and batched), and where the time goes (decode, preprocess, each
model's network and top-k/NMS).

For each device, every configuration is loaded, warmed up, then timed on the sample photos request by
request in interleaved order (A, B, A, B, ...), synchronising the device around each clock read. The
``mock`` path is the lower bound: the same I/O path with an optimization that returns constant "nothing
detected" outputs instead of running the networks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from multidet.config import Settings
from multidet.device import synchronize
from multidet.optimizations import OPTIMIZATIONS
from multidet.pipeline import Detector
from multidet.timing import interleaved

from ..bench import SEED, environment, model_breakdown, photos, summarize, timed_batch
from . import Result, Say, say_flush

STAGES = ("decode", "preprocess", "inference", "postprocess")


def measure_device(
    model_set: Path,
    device: torch.device,
    paths: list[str],
    bodies: list[bytes],
    requests: int,
    warmup: int,
    batch_size: int,
    breakdown_requests: int,
    say: Say,
) -> dict:
    configs = {}
    for name in paths:
        t0 = time.perf_counter()
        det = Detector.from_model_set(model_set, Settings(optimization=name), device)
        for i in range(warmup):
            det.predict_one(bodies[i % len(bodies)])
        configs[name] = det
        say(f"[{device}] loaded {name} + {warmup} warm-up requests in {time.perf_counter() - t0:.1f} s")

    t_start = time.perf_counter()

    def progress(done: int, latency: dict) -> None:
        if done % max(1, requests // 5) == 0 or done == requests:
            say(
                f"[{device}] {done}/{requests} requests per config ({time.perf_counter() - t_start:.0f} s): "
                + ", ".join(f"{n} p50 {statistics.median(v):.1f} ms" for n, v in latency.items())
            )

    calls = {name: (lambda i, det=det: det.predict_one(bodies[i % len(bodies)])) for name, det in configs.items()}
    timings = interleaved(calls, requests, sync=lambda: synchronize(device), keep_results=True, progress=progress)
    latency = timings.ms
    stages = {n: {s: [r["timing_ms"][s] for r in timings.results[n]] for s in STAGES} for n in configs}

    batch_ms = {n: [] for n in configs}
    batch_calls = max(1, requests // (2 * batch_size))
    for i in range(batch_calls):
        chunk = [bodies[(i * batch_size + j) % len(bodies)] for j in range(batch_size)]
        for name, det in configs.items():
            batch_ms[name].append(timed_batch(det, chunk))
    say(
        f"[{device}] batches of {batch_size}: "
        + ", ".join(f"{n} {batch_size * 1e3 / statistics.median(v):.2f} img/s" for n, v in batch_ms.items())
    )

    breakdown = {}
    for name, det in configs.items():
        if not all(g.optimization.separable for g in det.groups):
            continue
        runs = [model_breakdown(det, bodies[i % len(bodies)]) for i in range(breakdown_requests)]
        breakdown[name] = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}

    out = {}
    for name in configs:
        lat = summarize(latency[name])
        out[name] = {
            "latency_ms": lat,
            "throughput_img_s": round(1e3 * len(latency[name]) / sum(latency[name]), 3),
            "batch": {
                "batch_size": batch_size,
                "calls": batch_calls,
                "ms_per_call": summarize(batch_ms[name]),
                "throughput_img_s": round(batch_size * 1e3 * batch_calls / sum(batch_ms[name]), 3),
            },
            "stages_ms_mean": {s: round(statistics.fmean(v), 3) for s, v in stages[name].items()},
            "breakdown_ms_p50": breakdown.get(name),
            "description": configs[name].description,
        }
    return out


def report(results: dict) -> str:
    env, lines = results["environment"], []
    lines.append(
        f"Benchmark {env['date']}  host {env['host']}  CPU {env['cpu']} ({env['cpu_cores']} cores, "
        f"{env['torch_threads']} torch threads)  torch {env['versions']['torch']}"
    )
    lines.append(
        f"{results['requests']} timed requests per configuration after {results['warmup']} warm-up, "
        f"photos {', '.join(results['images'])}, threshold {results['threshold']}, configurations interleaved"
    )
    lines.append("")
    lines.append("Latency per image, end to end in the core package (decode to response), ms")
    head = (
        f"{'device':<8} {'optimization':<16} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8} {'std':>7} {'min':>8} "
        f"{'max':>8} {'img/s':>7} {'batch img/s':>12}"
    )
    lines += [head, "-" * len(head)]
    for dev, paths in results["devices"].items():
        for name, r in paths.items():
            lat = r["latency_ms"]
            lines.append(
                f"{dev:<8} {name:<16} {lat['p50']:>8.1f} {lat['p90']:>8.1f} {lat['p99']:>8.1f} {lat['mean']:>8.1f} "
                f"{lat['std']:>7.1f} {lat['min']:>8.1f} {lat['max']:>8.1f} {r['throughput_img_s']:>7.2f} "
                f"{r['batch']['throughput_img_s']:>12.2f}"
            )
    lines.append("")
    lines.append("Where the time goes (median ms of one request, models run one at a time)")
    for dev, paths in results["devices"].items():
        for name, r in paths.items():
            if r["breakdown_ms_p50"]:
                parts = ", ".join(f"{k} {v:.1f}" for k, v in r["breakdown_ms_p50"].items())
                lines.append(f"  {dev}/{name}: {parts}")
    lines.append("")
    lines.append("Bounds and speed-ups (p50)")
    cpu = results["devices"].get("cpu", {}).get("baseline")
    for dev, paths in results["devices"].items():
        real = paths.get("baseline")
        if real and "mock" in paths:
            mock = paths["mock"]["latency_ms"]["p50"]
            lines.append(
                f"  {dev}: mock lower bound {mock:.1f} ms vs baseline {real['latency_ms']['p50']:.1f} ms: "
                f"the networks + their NMS are {100 * (1 - mock / real['latency_ms']['p50']):.0f} % of a request"
            )
        if real and cpu and dev != "cpu":
            lines.append(f"  {dev} vs cpu (baseline): {cpu['latency_ms']['p50'] / real['latency_ms']['p50']:.2f}x")
        for name, r in paths.items():
            if real and name not in ("baseline", "mock"):
                lines.append(
                    f"  {dev}/{name} vs {dev}/baseline: {real['latency_ms']['p50'] / r['latency_ms']['p50']:.2f}x"
                )
    if cpu:
        lines.append("")
        lines.append(
            f"Seed report for comparison: CPU baseline {SEED['cpu_baseline_ms']:.0f} ms on {SEED['cpu_hardware']}, "
            f"MPS {SEED['mps_baseline_ms']:.0f} ms, MPS+vmap {SEED['mps_vmap_ms']:.0f} ms; "
            f"this run: CPU baseline p50 {cpu['latency_ms']['p50']:.0f} ms on {env['cpu']}"
        )
    return "\n".join(lines) + "\n"


class BenchmarkResult(Result):
    stem = "benchmark"

    def report(self) -> str:
        return report(self.data)


def run(
    model_set: Path,
    devices: Sequence[torch.device],
    paths: Sequence[str],
    photo_dir: Path,
    requests: int = 40,
    warmup: int = 3,
    batch_size: int = 4,
    breakdown_requests: int | None = None,
    say: Say = say_flush,
) -> BenchmarkResult:
    """Each of ``paths`` that a device supports, on each of ``devices``."""
    images = photos(photo_dir)
    results = {
        "environment": environment(devices),
        "requests": requests,
        "warmup": warmup,
        "images": list(images),
        "threshold": Settings().threshold,
        "optimizations": list(paths),
        "devices": {},
    }
    for device in devices:
        valid = [n for n in paths if OPTIMIZATIONS[n].supports(device)]
        results["devices"][device.type] = measure_device(
            model_set,
            device,
            valid,
            list(images.values()),
            requests,
            warmup,
            batch_size,
            breakdown_requests or min(requests, 12),
            say,
        )
    return BenchmarkResult(results)
