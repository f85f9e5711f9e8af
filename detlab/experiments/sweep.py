"""HTTP latency and throughput under increasing load: Locust (the load_tests package, real JPEGs,
every response checked) against a real TorchServe at 1, 2, 4, 8 ... concurrent users, with
TorchServe's batching off and on.

Per step: achieved requests/s, client-side p50/p95/p99 and failures (Locust), and TorchServe's own
figures for the same interval: queue time and frontend time per request (metrics endpoint
counters), handler time per batch and requests per batch (the worker's metric lines in
ts_log.log), so a reader sees whether latency grows in the queue or in the model. The saturation
point is the first step after which adding users raises throughput by less than 10 %. Each
configuration gets its own server (started here on free ports, stopped after) unless an external
server is given.
"""

from __future__ import annotations

import csv
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import requests as http_client

from ..bench import available_devices, backend_metrics, counter_delta, environment, photos, scrape_metrics
from ..server import BIN, Serving
from . import Result, Say, say_flush

SATURATION_GAIN = 1.10


def locust_step(locustfile: Path, host: str, users: int, duration: int, prefix: Path) -> dict:
    cmd = [
        str(BIN / "locust"),
        "-f",
        str(locustfile),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{duration}s",
        "--host",
        host,
        "--csv",
        str(prefix),
        "--only-summary",
        "--stop-timeout",
        "30",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(locustfile).parent, timeout=duration + 300)
    stats_file = Path(f"{prefix}_stats.csv")
    if not stats_file.exists():
        raise RuntimeError(f"locust wrote no statistics (exit {r.returncode}):\n{r.stderr[-3000:]}")
    rows = {row["Name"]: row for row in csv.DictReader(stats_file.open())}
    row = rows.get("/predictions/all") or rows["Aggregated"]

    def number(key: str) -> float:  # Locust writes "N/A" for a step in which no request completed
        return float(row[key]) if row[key] not in ("", "N/A") else float("nan")

    return {
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "rps": round(number("Requests/s"), 3),
        "p50_ms": number("50%"),
        "p95_ms": number("95%"),
        "p99_ms": number("99%"),
        "mean_ms": round(number("Average Response Time"), 1),
        "max_ms": number("Max Response Time"),
        "locust_exit": r.returncode,
    }


def server_figures(before: dict, after: dict, ts_log: Path | None, since: float, until: float) -> dict:
    served = counter_delta(before, after, "ts_inference_requests_total")
    out = {"served": int(served)}
    if served > 0:
        queue = counter_delta(before, after, "ts_queue_latency_microseconds") / served / 1e3
        total = counter_delta(before, after, "ts_inference_latency_microseconds") / served / 1e3
        out.update(queue_ms=round(queue, 2), frontend_ms=round(total, 2), worker_ms=round(total - queue, 2))
    if ts_log is not None:
        worker = backend_metrics(ts_log, since, until)
        handler, sizes = worker.get("HandlerTime", []), worker.get("multidet_batch_images", [])
        if handler:
            out["handler_ms_per_batch"] = round(sum(handler) / len(handler), 2)
        if sizes:
            out.update(batches=len(sizes), mean_batch_size=round(sum(sizes) / len(sizes), 2))
    return out


def saturation(steps: list[dict]) -> dict | None:
    """The first step after which more users add < 10 % throughput (None if throughput kept rising)."""
    for a, b in zip(steps, steps[1:]):
        if b["rps"] < SATURATION_GAIN * a["rps"]:
            return {"users": a["users"], "rps": a["rps"], "p50_ms": a["p50_ms"]}
    return None


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for label, cfg in results["configs"].items():
        users = [s["users"] for s in cfg["steps"]]
        (line,) = axes[0].plot(users, [s["p50_ms"] for s in cfg["steps"]], "o-", label=f"{label} p50")
        axes[0].plot(users, [s["p95_ms"] for s in cfg["steps"]], "s--", color=line.get_color(), label=f"{label} p95")
        axes[1].plot(users, [s["rps"] for s in cfg["steps"]], "o-", color=line.get_color(), label=label)
        axes[2].plot(
            users,
            [s["server"].get("queue_ms", 0) for s in cfg["steps"]],
            "o-",
            color=line.get_color(),
            label=f"{label} queue",
        )
        axes[2].plot(
            users,
            [s["server"].get("worker_ms", 0) for s in cfg["steps"]],
            "s--",
            color=line.get_color(),
            label=f"{label} worker",
        )
        if cfg.get("saturation"):
            axes[1].axvline(cfg["saturation"]["users"], color=line.get_color(), ls=":", lw=1)
    titles = (
        "client latency (ms)",
        "achieved requests/s (dotted: saturation)",
        "TorchServe: queue vs worker ms/request",
    )
    axes[1].set_ylim(bottom=0)
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["users"], [str(u) for u in results["users"]])
        ax.set_xlabel("concurrent users")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    env = results["environment"]
    fig.suptitle(
        f"Load sweep {env['date'][:10]}, {env['cpu']} ({env['cpu_cores']} cores), path {results['optimization']}, "
        f"{results['duration_s']} s per step",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class SweepResult(Result):
    stem = "sweep"

    @property
    def failures(self) -> int:
        return sum(s["failures"] for cfg in self.data["configs"].values() for s in cfg["steps"])

    def report(self) -> str:
        env = self.data["environment"]
        lines = [
            f"Load sweep {env['date']}, {env['cpu']} ({env['cpu_cores']} cores), path {self.data['optimization']}, "
            f"{self.data['duration_s']} s per step",
            "",
            f"{'configuration':<58} {'users':>5} {'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7} {'fail':>5} "
            f"{'queue':>7} {'worker':>7} {'batch':>5}",
        ]
        for label, cfg in self.data["configs"].items():
            for s in cfg["steps"]:
                srv = s["server"]
                lines.append(
                    f"{label:<58} {s['users']:>5} {s['rps']:>7.2f} {s['p50_ms']:>7.0f} {s['p95_ms']:>7.0f} "
                    f"{s['p99_ms']:>7.0f} {s['failures']:>5} {srv.get('queue_ms', float('nan')):>7.0f} "
                    f"{srv.get('worker_ms', float('nan')):>7.0f} {srv.get('mean_batch_size', float('nan')):>5.1f}"
                )
        lines.append("")
        for label, cfg in self.data["configs"].items():
            sat = cfg["saturation"]
            lines.append(
                f"{label}: "
                + (
                    f"saturates at {sat['users']} users, {sat['rps']:.2f} req/s (p50 {sat['p50_ms']:.0f} ms)"
                    if sat
                    else "throughput still rising at the last step"
                )
            )
        return "\n".join(lines) + "\n"

    def plot(self, png: Path) -> Path:
        return plot(self.data, png)

    def write(self, out: Path) -> Path:
        written = super().write(out)
        self.write_csv(out / "sweep.csv")
        return written

    def write_csv(self, path: Path) -> Path:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "config",
                    "users",
                    "requests",
                    "failures",
                    "rps",
                    "p50_ms",
                    "p95_ms",
                    "p99_ms",
                    "mean_ms",
                    "queue_ms",
                    "worker_ms",
                    "handler_ms_per_batch",
                    "mean_batch_size",
                ]
            )
            for label, cfg in self.data["configs"].items():
                for s in cfg["steps"]:
                    srv = s["server"]
                    w.writerow(
                        [
                            label,
                            s["users"],
                            s["requests"],
                            s["failures"],
                            s["rps"],
                            s["p50_ms"],
                            s["p95_ms"],
                            s["p99_ms"],
                            s["mean_ms"],
                            srv.get("queue_ms"),
                            srv.get("worker_ms"),
                            srv.get("handler_ms_per_batch"),
                            srv.get("mean_batch_size"),
                        ]
                    )
        return path


def run(
    serving: Serving | None,
    locustfile: Path,
    photo_dir: Path,
    users: Sequence[int] = (1, 2, 4, 8),
    duration: int = 30,
    batching: Sequence[str] = ("off", "on"),
    batch_size: int = 4,
    max_batch_delay: int = 50,
    optimization: str = "auto",
    warmup: int = 4,
    external: str | None = None,
    external_metrics: str | None = None,
    say: Say = say_flush,
) -> SweepResult:
    """Locust (``locustfile``) at each of ``users`` for ``duration`` s against a TorchServe of ``serving``
    per ``batching`` configuration ("off", "on"), or against the running server at ``external``."""
    levels = list(users)
    configs = ["external"] if external else list(batching)
    if not set(configs) <= {"off", "on", "external"}:
        raise ValueError(f"batching takes off and/or on, not {configs}")
    images = photos(photo_dir)
    results = {
        "environment": environment(available_devices()),
        "optimization": optimization,
        "duration_s": duration,
        "users": levels,
        "images": list(images),
        "configs": {},
    }
    with tempfile.TemporaryDirectory(prefix="sweep-locust-") as locust_out:
        work = Path(locust_out)
        body = next(iter(images.values()))
        for config in configs:
            label = {
                "off": "batching off",
                "on": f"batching on (batchSize {batch_size}, maxBatchDelay {max_batch_delay} ms)",
                "external": external,
            }[config]
            with ExitStack() as stack:
                if config == "external":
                    host, metrics_url, ts_log = external, external_metrics, None
                else:
                    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"sweep-{config}-")))
                    t0 = time.perf_counter()
                    batch_opts = (
                        {"batch_size": batch_size, "max_batch_delay": max_batch_delay} if config == "on" else {}
                    )
                    server = stack.enter_context(serving.start(tmp, optimization=optimization, **batch_opts))
                    host, metrics_url, ts_log = server.inference, server.metrics, server.workdir / "logs" / "ts_log.log"
                    say(f"[{label}] TorchServe ready in {time.perf_counter() - t0:.0f} s at {host}")
                for _ in range(warmup):
                    http_client.put(f"{host}/predictions/all", data=body, timeout=120)
                steps = []
                for users in levels:
                    before, since = scrape_metrics(metrics_url), time.time()
                    step = locust_step(locustfile, host, users, duration, work / f"locust_{config}_{users}u")
                    until = time.time()
                    step = {
                        "users": users,
                        **step,
                        "server": server_figures(before, scrape_metrics(metrics_url), ts_log, since, until),
                    }
                    steps.append(step)
                    srv = step["server"]
                    say(
                        f"[{label}] {users} users: {step['rps']:.2f} req/s, "
                        f"p50 {step['p50_ms']:.0f} / p95 {step['p95_ms']:.0f} / "
                        f"p99 {step['p99_ms']:.0f} ms, {step['failures']} failures of {step['requests']}; "
                        f"server queue {srv.get('queue_ms', float('nan')):.0f} ms, "
                        f"worker {srv.get('worker_ms', float('nan')):.0f} ms, "
                        f"batch {srv.get('mean_batch_size', float('nan')):.1f}"
                    )
            results["configs"][label] = {"batching": config, "steps": steps, "saturation": saturation(steps)}
    return SweepResult(results)
