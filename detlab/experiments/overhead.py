"""What serving costs on top of inference: the same photos through (a) the core package, (b) the
TorchServe handler in embedded mode (TorchServe's Context, request dicts, JSON), (c) a real
TorchServe over HTTP (started on free ports, stopped after), per optimization.

The three modes run in rounds (each mode sends every photo once, the order rotating per round), so
a noisy machine does not favour one. Overhead = p50(b) - p50(a) (handler) and p50(c) - p50(b) (the
frontend, IPC to the worker and HTTP), in ms and % of (a). Because those differences of percentiles
carry the machine's noise, each request's wall clock minus the pipeline's own timing_ms.total (from
the response itself) is reported too: the serving cost paired per request. TorchServe's own queue
time (metrics endpoint) is reported alongside.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests as http_client
import torch

from multidet.config import Settings
from multidet.pipeline import Detector
from multidet.timing import interleaved

from ..bench import SEED, counter_delta, environment, photos, scrape_metrics, summarize, timed_predict
from ..embedded import EmbeddedService
from ..server import Serving
from . import Result, Say, say_flush

MODES = ("core", "embedded", "http")


def measure_path(
    name: str,
    device: torch.device,
    images: list[bytes],
    serving: Serving,
    requests: int,
    warmup: int,
    server_timeout: float,
    say: Say,
) -> dict:
    t0 = time.perf_counter()
    core = Detector.from_model_set(serving.model_set, Settings(optimization=name), device)
    embedded = EmbeddedService(Settings(optimization=name), serving.model_set.parent, serving.handler)
    say(f"[{name}] core + embedded loaded in {time.perf_counter() - t0:.0f} s; starting TorchServe ...")
    with (
        tempfile.TemporaryDirectory(prefix=f"overhead-{name}-") as tmp,
        serving.start(Path(tmp), timeout=server_timeout, optimization=name) as server,
        http_client.Session() as http,
    ):
        say(
            f"[{name}] MAR built in {server.build_s:.0f} s; TorchServe started to a READY worker in "
            f"{server.startup_s:.0f} s"
        )
        startup = {"mar_build_s": round(server.build_s, 1), "start_to_ready_s": round(server.startup_s, 1)}

        def via_core(body):
            ms, result = timed_predict(core, body)
            return ms, result["timing_ms"]["total"]

        def via_embedded(body):
            t = time.perf_counter()
            response = embedded.predict_one(body)
            if response.status != 200:
                raise RuntimeError(f"embedded handler answered {response.status}: {response.body}")
            return (time.perf_counter() - t) * 1e3, response.body["timing_ms"]["total"]

        def via_http(body):
            t = time.perf_counter()
            response = http.put(f"{server.inference}/predictions/all", data=body, timeout=120)
            if response.status_code != 200:
                raise RuntimeError(f"TorchServe answered {response.status_code}: {response.text[:300]}")
            return (time.perf_counter() - t) * 1e3, response.json()["timing_ms"]["total"]

        run = {"core": via_core, "embedded": via_embedded, "http": via_http}
        calls = {m: (lambda i, fn=run[m]: fn(images[i % len(images)])) for m in MODES}

        def progress(done: int, times: dict) -> None:
            if done % len(images) == 0 or done == requests:
                say(
                    f"[{name}] {done}/{requests}: "
                    + ", ".join(f"{m} {sorted(v)[len(v) // 2]:.1f} ms" for m, v in times.items())
                )

        before = scrape_metrics(server.metrics)
        timings = interleaved(calls, requests, warmup=warmup, keep_results=True, progress=progress)
        after = scrape_metrics(server.metrics)
        times = {m: [wall for wall, _ in timings.results[m]] for m in MODES}
        # per request: wall clock minus the pipeline's own timing_ms.total
        outside = {m: [wall - inner for wall, inner in timings.results[m]] for m in MODES}

    served = counter_delta(before, after, "ts_inference_requests_total")
    stats = {m: summarize(v) for m, v in times.items()}
    core_p50 = stats["core"]["p50"]

    def overhead(a: str, b: str) -> dict:
        ms = stats[b]["p50"] - stats[a]["p50"]
        return {"ms": round(ms, 2), "pct_of_core": round(100 * ms / core_p50, 2)}

    return {
        "runs_as": core.description,
        "torchserve_startup": startup,
        "latency_ms": stats,
        "overhead_p50": {
            "handler (embedded - core)": overhead("core", "embedded"),
            "frontend+ipc+http (http - embedded)": overhead("embedded", "http"),
            "total (http - core)": overhead("core", "http"),
        },
        # paired per request, so far less noisy than differences of percentiles across modes
        "outside_pipeline_ms": {m: summarize(v) for m, v in outside.items()},
        "torchserve_metrics_per_request_ms": {
            "queue": round(
                (after.get("ts_queue_latency_microseconds", 0) - before.get("ts_queue_latency_microseconds", 0))
                / max(served, 1)
                / 1e3,
                3,
            ),
            "frontend_total": round(
                (after.get("ts_inference_latency_microseconds", 0) - before.get("ts_inference_latency_microseconds", 0))
                / max(served, 1)
                / 1e3,
                3,
            ),
            "requests": served,
        },
    }


def report(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"Serving overhead {env['date']}  {results['device']} ({env['devices'][results['device']]}), "
        f"{env['cpu_cores']} cores, torch {env['versions']['torch']}, TorchServe {env['versions']['torchserve']}",
        f"{results['requests']} requests per mode and path, modes in rotating rounds, one client, photos "
        f"{', '.join(results['images'])}",
        "",
    ]
    head = f"{'optimization':<16} {'mode':<9} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}"
    lines += [head, "-" * len(head)]
    for name, r in results["optimizations"].items():
        for mode in MODES:
            s = r["latency_ms"][mode]
            lines.append(f"{name:<16} {mode:<9} {s['p50']:>8.1f} {s['p99']:>8.1f} {s['mean']:>8.1f}")
    lines.append("")
    for name, r in results["optimizations"].items():
        parts = "; ".join(f"{k}: {v['ms']:+.1f} ms ({v['pct_of_core']:+.1f} %)" for k, v in r["overhead_p50"].items())
        m = r["torchserve_metrics_per_request_ms"]
        lines.append(f"{name} (runs as {r['runs_as']}): {parts}; TorchServe queue {m['queue']:.2f} ms/request")
        lines.append(
            f"  MAR build {r['torchserve_startup']['mar_build_s']:.0f} s, TorchServe start to a READY worker "
            f"{r['torchserve_startup']['start_to_ready_s']:.0f} s"
        )
        paired = ", ".join(
            f"{mode} {r['outside_pipeline_ms'][mode]['p50']:.2f} ms (p99 {r['outside_pipeline_ms'][mode]['p99']:.2f})"
            for mode in MODES
        )
        lines.append(f"  paired per request, wall clock minus the pipeline's own timing (p50): {paired}")
    lines.append(f"\nSeed report: TorchServe overhead {SEED['torchserve_overhead_ms']} ms")
    return "\n".join(lines) + "\n"


class OverheadResult(Result):
    stem = "overhead"

    def report(self) -> str:
        return report(self.data)


def run(
    serving: Serving,
    paths: Sequence[str],
    device: torch.device,
    photo_dir: Path,
    requests: int = 24,
    warmup: int = 2,
    server_timeout: float = 600,
    say: Say = say_flush,
) -> OverheadResult:
    images = photos(photo_dir)
    results = {
        "environment": environment([device]),
        "device": str(device),
        "requests": requests,
        "images": list(images),
        "optimizations": {},
    }
    for name in paths:
        results["optimizations"][name] = measure_path(
            name, device, list(images.values()), serving, requests, warmup, server_timeout, say
        )
    return OverheadResult(results)
