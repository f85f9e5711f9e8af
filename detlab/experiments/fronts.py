"""The two serving fronts side by side, in one run: TorchServe and Ray Serve serving the same model set
with the same optimization and torch threads, against the core package called in-process.

1. Latency of one image, one client, modes interleaved by the one timing loop (``pause_s`` between calls: the
   in-process call's OpenMP threads spin on both cores for a while after it, which a server's call just after
   would pay for): ``core`` (Detector.predict),
   ``torchserve`` (PUT /predictions/all), ``ray`` (the same route on Ray Serve) and ``ray_oip`` (OIP v2
   infer, binary-data extension). Per mode p50/p99 and the protocol's cost paired per request: the wall
   clock minus the pipeline's own ``timing_ms.total`` from the response.
2. Throughput at saturation: ``requests`` images sent by ``clients`` concurrent clients (a fixed count, not
   a duration) to TorchServe (1 worker, batchSize ``batch``), Ray Serve with 1 replica x 2 threads and
   with 2 replicas x 1 thread (``@serve.batch`` of ``batch``); images per second and p50/p99 under load.
3. What one Ray replica costs in memory: each replica process's resident set after the run.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests as http_client
import torch

from multidet.config import Settings
from multidet.pipeline import Detector
from multidet.timing import interleaved

from ..bench import environment, photos, summarize, timed_predict
from ..server import Serving, free_ports
from . import Result, Say, say_flush

MODES = ("core", "torchserve", "ray", "ray_oip")


def oip_body(image: bytes) -> tuple[bytes, dict[str, str]]:
    """An OIP v2 infer request for one image, binary-data extension (what tritonclient sends)."""
    import json

    from multidet.oip import HEADER_LENGTH, pack_bytes

    data = pack_bytes([image])
    header = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(data)}}],
        "parameters": {"binary_data_output": True},
    }
    text = json.dumps(header).encode()
    return text + data, {HEADER_LENGTH: str(len(text)), "content-type": "application/octet-stream"}


def timing_of_oip(body: bytes, headers) -> float:
    import json

    from multidet.oip import HEADER_LENGTH

    length = int(headers.get(HEADER_LENGTH, len(body)))
    return json.loads(json.loads(body[:length])["parameters"]["multidet"])[0]["timing_ms"]["total"]


def caller(session: http_client.Session, mode: str, url: str) -> Callable[[bytes], tuple[float, float]]:
    """One request of ``mode`` -> (wall ms, the pipeline's own total ms)."""

    def call(image: bytes) -> tuple[float, float]:
        t0 = time.perf_counter()
        if mode == "ray_oip":
            body, headers = oip_body(image)
            r = session.post(f"{url}/v2/models/all/infer", data=body, headers=headers, timeout=300)
        else:
            r = session.put(f"{url}/predictions/all", data=image, timeout=300)
        wall = (time.perf_counter() - t0) * 1e3
        if r.status_code != 200:
            raise RuntimeError(f"{mode} answered {r.status_code}: {r.text[:300]}")
        inner = timing_of_oip(r.content, r.headers) if mode == "ray_oip" else r.json()["timing_ms"]["total"]
        return wall, inner

    return call


def saturate(url: str, images: list[bytes], clients: int, requests: int) -> dict:
    """``requests`` images through ``clients`` concurrent clients; throughput and latency under that load."""
    walls: list[float] = []

    def one(i: int) -> None:
        with http_client.Session() as s:
            call = caller(s, "http", url)
            for k in range(i, requests, clients):
                wall, _ = call(images[k % len(images)])
                walls.append(wall)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    elapsed = time.perf_counter() - t0
    return {"images_per_s": round(requests / elapsed, 2), "wall_s": round(elapsed, 1), "latency_ms": summarize(walls)}


def replica_memory_mb() -> list[float]:
    """Resident memory of each live Ray Serve replica of the application (this machine's processes)."""
    import psutil
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "ServeReplica:multidet:multidet"), ("state", "=", "ALIVE")])
    return [round(psutil.Process(a.pid).memory_info().rss / 2**20, 1) for a in actors if a.pid]


class FrontsResult(Result):
    stem = "fronts"

    def report(self) -> str:
        d, env = self.data, self.data["environment"]
        lines = [
            f"Serving fronts {env['date']}  {env['cpu']} ({' '.join(env['cpu_isa'])}), {env['cpu_cores']} "
            f"cores, torch {env['versions']['torch']}, TorchServe {env['versions']['torchserve']}, Ray {d['ray']}",
            f"optimization {d['optimization']}, {d['threads']} torch threads everywhere; {d['requests']} requests per "
            f"mode, one client, modes interleaved with {d['pause_s']} s between calls; photos {', '.join(d['images'])}",
            "",
            f"{'mode':<11} {'p50 ms':>8} {'p99 ms':>8} {'outside pipeline p50 ms':>24} {'p99':>8}",
        ]
        for mode in MODES:
            s, o = d["latency_ms"][mode], d["outside_pipeline_ms"][mode]
            lines.append(f"{mode:<11} {s['p50']:>8.1f} {s['p99']:>8.1f} {o['p50']:>24.2f} {o['p99']:>8.2f}")
        lines += [
            "",
            f"Saturation: {d['saturation_requests']} images, {d['clients']} concurrent clients, batch {d['batch']}",
        ]
        lines.append(f"{'server':<28} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
        for name, s in d["saturation"].items():
            lines.append(
                f"{name:<28} {s['images_per_s']:>9.2f} {s['latency_ms']['p50']:>8.1f} {s['latency_ms']['p99']:>8.1f}"
            )
        lines.append(f"\nRay replica resident memory (MB): {d['ray_replica_rss_mb']}")
        return "\n".join(lines) + "\n"

    def plot(self, png: Path) -> Path | None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d = self.data
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        x = np.arange(len(MODES))
        a.bar(x - 0.2, [d["latency_ms"][m]["p50"] for m in MODES], 0.4, label="p50")
        a.bar(x + 0.2, [d["latency_ms"][m]["p99"] for m in MODES], 0.4, label="p99")
        a.set_xticks(x, MODES)
        a.set_ylabel("ms, one image, one client")
        a.set_title("Latency: in-process vs each front")
        a.legend()
        names = list(d["saturation"])
        b.bar(range(len(names)), [d["saturation"][n]["images_per_s"] for n in names], color="tab:green")
        b.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
        b.set_ylabel("images / s")
        b.set_title(f"Saturation ({d['clients']} clients)")
        fig.suptitle(f"{d['environment']['cpu']}, {d['environment']['date']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
        return png


def run(
    serving: Serving,
    photo_dir: Path,
    optimization: str = "baseline",
    requests: int = 24,
    warmup: int = 2,
    clients: int = 8,
    saturation_requests: int = 48,
    batch: int = 4,
    server_timeout: float = 600,
    pause_s: float = 0.2,
    say: Say = say_flush,
) -> FrontsResult:
    import ray
    from ray import serve

    from multidet.ray_app import deploy, serving_environment

    images = photos(photo_dir)
    bodies = list(images.values())
    threads = torch.get_num_threads()
    device = torch.device("cpu")
    ray_args = {
        "model_set": str(Path(serving.model_set).resolve()),
        "optimization": optimization,
        "max_batch_size": batch,
        "batch_wait_s": 0.05,
    }
    one_replica = {**ray_args, "num_replicas": 1, "num_cpus": threads, "threads": threads}
    two_replicas = {**ray_args, "num_replicas": 2, "num_cpus": max(threads // 2, 1), "threads": max(threads // 2, 1)}
    results: dict = {
        "environment": environment([device]),
        "ray": ray.__version__,
        "optimization": optimization,
        "threads": threads,
        "requests": requests,
        "images": list(images),
        "clients": clients,
        "saturation_requests": saturation_requests,
        "batch": batch,
        "pause_s": pause_s,
    }
    core = Detector.from_model_set(serving.model_set, Settings(optimization=optimization), device)
    serving_environment()
    ray.init(num_cpus=threads, include_dashboard=True, logging_level="WARNING")
    try:
        with (
            tempfile.TemporaryDirectory(prefix="fronts-") as tmp,
            serving.start(
                Path(tmp), timeout=server_timeout, optimization=optimization, batch_size=batch, max_batch_delay=50
            ) as ts,
        ):
            say(f"TorchServe ready (MAR {ts.build_s:.0f} s, start {ts.startup_s:.0f} s); deploying Ray Serve ...")
            t0 = time.perf_counter()
            url = deploy(one_replica, port=free_ports(1)[0], timeout=server_timeout)
            say(f"Ray Serve ready in {time.perf_counter() - t0:.0f} s; latency, {requests} requests per mode")
            with http_client.Session() as s:
                run_mode = {
                    "core": lambda b: (lambda ms, r: (ms, r["timing_ms"]["total"]))(*timed_predict(core, b)),
                    "torchserve": caller(s, "torchserve", ts.inference),
                    "ray": caller(s, "ray", url),
                    "ray_oip": caller(s, "ray_oip", url),
                }
                calls = {m: (lambda i, fn=run_mode[m]: fn(bodies[i % len(bodies)])) for m in MODES}
                timings = interleaved(calls, requests, warmup=warmup, pause_s=pause_s, keep_results=True)
            results["latency_ms"] = {m: summarize([w for w, _ in timings.results[m]]) for m in MODES}
            results["outside_pipeline_ms"] = {m: summarize([w - i for w, i in timings.results[m]]) for m in MODES}
            sat = {}
            say(f"saturation: {saturation_requests} images, {clients} clients ...")
            sat[f"TorchServe 1 worker x {threads} threads"] = saturate(
                ts.inference, bodies, clients, saturation_requests
            )
            sat[f"Ray 1 replica x {threads} threads"] = saturate(url, bodies, clients, saturation_requests)
            ts.stop()  # its worker's CPUs go to the two replicas
            serve.delete("multidet")  # a redeploy would start the new replicas beside the old: no CPUs left for them
            deploy(two_replicas, port=int(url.rsplit(":", 1)[1]), timeout=server_timeout)
            rss = replica_memory_mb()
            sat[f"Ray 2 replicas x {two_replicas['threads']} thread"] = saturate(
                url, bodies, clients, saturation_requests
            )
            results["saturation"] = sat
            results["ray_replica_rss_mb"] = rss
    finally:
        serve.shutdown()
        ray.shutdown()
    return FrontsResult(results)
