"""Measuring helpers shared by the experiments (detlab.experiments): photos, percentiles, environment, metrics.

Rules every script follows: warm-up excluded; the device synchronised before each clock read; the
same photos for every configuration; configurations interleaved request by request so a noisy
machine does not favour one; the environment (date, torch, device, cores) recorded in every JSON.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

import torch

from multidet.decode import decode_image
from multidet.device import cpu_flags, synchronize
from multidet.pipeline import Detector, RequestOptions

# Figures of the seed project's report, compared in docs/benchmarks.md where ours correspond.
SEED = {
    "cpu_baseline_ms": 1020.0,
    "cpu_hardware": "Apple M4 Pro",
    "mps_baseline_ms": 88.0,
    "mps_vmap_ms": 37.0,
    "torchserve_overhead_ms": 3.7,
}


def photos(directory: Path) -> dict[str, bytes]:
    found = {p.stem: p.read_bytes() for p in sorted(directory.glob("*.jpg"))}
    if not found:
        raise FileNotFoundError(f"no JPEG photos in {directory}")
    return found


def write_outputs(out: Path, stem: str, results: dict, report: str) -> None:
    """``<stem>_results.json`` and ``<stem>_report.txt`` in ``out``; the report is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}_report.txt").write_text(report)
    print("\n" + report + f"written: {out}/{stem}_results.json, {stem}_report.txt", flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p95/p99, mean, std, min, max (same unit as ``values``) and the sample count."""
    values = list(values)
    out = {f"p{q}": percentile(values, q) for q in (50, 90, 95, 99)}
    out.update(
        mean=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else 0.0,
        min=min(values),
        max=max(values),
    )
    return {k: round(v, 3) for k, v in out.items()} | {"n": len(values)}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_isa() -> list[str]:
    """The matrix/vector extensions that decide which CPU paths are fast (``lscpu`` flags)."""
    return [f for f in ISA_FLAGS if f in cpu_flags()]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({cpu_model()})"
    return cpu_model()


def available_devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda:0"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(torch.device("mps"))
    return devices


def environment(devices: Iterable[torch.device] = ()) -> dict:
    """What a reader needs to compare runs: date, hardware, versions."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {
            p: _version(p)
            for p in (
                "torch",
                "torchvision",
                "effdet",
                "timm",
                "torchserve",
                "onnxruntime",
                "openvino",
                "nncf",
                "locust",
            )
        },
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "devices": {str(d): device_name(d) for d in devices},
    }


def timed_predict(detector: Detector, body: bytes, options: RequestOptions | None = None) -> tuple[float, dict]:
    """End-to-end milliseconds of one request (decode to response dict) and the response."""
    synchronize(detector.device)
    t0 = time.perf_counter()
    result = detector.predict_one(body, options)
    synchronize(detector.device)
    return (time.perf_counter() - t0) * 1e3, result


def timed_batch(detector: Detector, bodies: Sequence[bytes], options: RequestOptions | None = None) -> float:
    """Milliseconds for one call with several images (one tensor batch, as TorchServe batching does)."""
    synchronize(detector.device)
    t0 = time.perf_counter()
    results = detector.predict(list(bodies), [options or RequestOptions()] * len(bodies))
    synchronize(detector.device)
    bad = [r for r in results if not isinstance(r, dict)]
    if bad:
        raise bad[0]
    return (time.perf_counter() - t0) * 1e3


@torch.inference_mode()
def model_breakdown(detector: Detector, body: bytes, threshold: float | None = None) -> dict[str, float]:
    """One request with a clock around each step, the models one at a time: decode, preprocess,
    then per model its network and its top-k/NMS, in milliseconds. For optimizations that run the models
    separately (baseline, channels_last, mock); fused paths only have a total."""
    device = detector.device
    threshold = detector.settings.threshold if threshold is None else threshold
    t0 = time.perf_counter()
    image = decode_image(body, detector.settings.decode_limits)
    t1 = time.perf_counter()
    batches = detector.prepare([image])
    thresholds = torch.tensor([threshold], device=device)
    synchronize(device)
    t2 = time.perf_counter()
    out = {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3}
    for group in detector.groups:
        batch = batches[group.preprocessor.key]
        for j, k in enumerate(group.indices):
            synchronize(device)
            t3 = time.perf_counter()
            raw = group.optimization.forward(batch.tensor, [j])[j]
            synchronize(device)
            t4 = time.perf_counter()
            group.optimization.select(j, raw, batch, thresholds).cpu()
            t5 = time.perf_counter()
            out[f"{detector.models[k].name}.network"] = (t4 - t3) * 1e3
            out[f"{detector.models[k].name}.nms"] = (t5 - t4) * 1e3
    return out


# -- TorchServe's own figures -----------------------------------------------------------------------
_PROM = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)\s*$")


def scrape_metrics(metrics_url: str | None) -> dict[str, float]:
    """TorchServe's /metrics now ({} when there is no metrics URL or it does not answer)."""
    if not metrics_url:
        return {}
    import requests

    try:
        return parse_prometheus(requests.get(f"{metrics_url}/metrics", timeout=10).text)
    except requests.RequestException:
        return {}


def counter_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    """How much a TorchServe counter grew between two scrapes (0 if it did not exist)."""
    return after.get(name, 0.0) - before.get(name, 0.0)


def parse_prometheus(text: str) -> dict[str, float]:
    """Metric name -> value summed over label sets (TorchServe's /metrics, prometheus mode)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _PROM.match(line.strip())
        if m and m.group(3) != "NaN":
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


_BACKEND = re.compile(r"\[METRICS\](\w+)\.\w+:([-0-9.eE]+)\|.*#hostname:[^,]*,(\d+),")


def backend_metrics(ts_log: Path, since: float, until: float) -> dict[str, list[float]]:
    """Per-batch figures the worker reported (HandlerTime ms, PredictionTime ms, multidet_batch_images, ...)
    between two unix times, from TorchServe's ts_log.log. Each line is logged twice by the frontend
    (stdout and the metrics logger): kept once per (name, timestamp, request id)."""
    seen, out = set(), {}
    if not ts_log.exists():
        return out
    for line in ts_log.read_text(errors="replace").splitlines():
        m = _BACKEND.search(line)
        if not m:
            continue
        name, value, stamp = m.group(1), float(m.group(2)), int(m.group(3))
        key = (name, stamp, line.rsplit(",", 2)[-2] if line.count(",") >= 2 else "")
        if key in seen or not int(since) <= stamp <= int(until):
            continue
        seen.add(key)
        out.setdefault(name, []).append(value)
    return out
