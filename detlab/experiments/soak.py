"""Sustained load with a mix of good and bad requests against a running server; reports failures by
status, p50/p99 over time, worker restarts and the worker's memory at start and end.

Windows alternate (``--window`` seconds each): a *clean* window sends only the good requests, a *mixed*
one the whole mix (about a fifth bad or hostile: detlab.hostile's files built to stall the decoder).
The p99 of good requests in mixed windows over that in clean ones, in the same run, says what the bad
traffic costs the good (the issue's bound: 1.5x).
Every request has an expected status (200 for photos, 400/413/415/422 for the bad ones); anything
else is an unexpected failure. ``SoakResult.ok`` is False if there was any, a worker
restarted, or the worker's RSS grew by more than the bound between the end of warm-up and the end.
"""

from __future__ import annotations

import io
import random
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import requests as http_client
from PIL import Image

from .. import hostile
from ..bench import environment, percentile
from . import Result, Say, say_flush


class SoakResult(Result):
    stem = "soak"

    def ok(self, max_rss_growth_pct: float = 10.0) -> bool:
        """No unexpected status, no worker restart, worker memory grown by at most the bound."""
        r = self.data
        return (
            r["unexpected_failures"] == 0
            and r["worker_restarts"] == 0
            and r["worker_rss_mib"]["growth_pct"] <= max_rss_growth_pct
        )

    def report(self) -> str:
        r, i = self.data, self.data["interleaved"]
        rss = r["worker_rss_mib"]
        return (
            f"{r['requests']} requests in {r['duration_s']:.0f} s; by status {r['by_status']}; "
            f"unexpected {r['unexpected_failures']}; good p50/p99 {r['good_latency_ms']['p50']}/"
            f"{r['good_latency_ms']['p99']} ms; worker RSS {rss['start']} -> {rss['end']} MiB "
            f"({rss['growth_pct']:+.1f} %)\n"
            f"good p99 clean/mixed windows {i['good_p99_ms']['clean']}/{i['good_p99_ms']['mixed']} ms "
            f"({i['p99_mixed_over_clean']}x; bad share of mixed {i['bad_share_of_mixed']:.0%}); "
            f"worker restarts {r['worker_restarts']}\n"
            + "".join(f"  unexpected: {k} x{n}\n" for k, n in r["unexpected_detail"].items())
        )

    def plot(self, png: Path) -> Path:
        return plot(self.data, png)


def request_mix(images: list[Path]) -> list[tuple[str, bytes, dict, int]]:
    """(name, body, headers, expected status): the photos, then the unusual and bad inputs and
    detlab.hostile's files built to stall or bloat the decoder (about a fifth of the mix)."""
    good = [(f"photo:{p.name}", p.read_bytes(), {}, 200) for p in images]
    photo = images[0].read_bytes()
    bomb = bytearray(photo)
    sof = bomb.find(b"\xff\xc0") if bomb.find(b"\xff\xc0") >= 0 else bomb.find(b"\xff\xc2")
    struct.pack_into(">HH", bomb, sof + 5, 30000, 30000)
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("L").save(buf, "PNG")
    bad = [
        ("grayscale_png", buf.getvalue(), {}, 200),
        ("threshold0", photo, {"X-Threshold": "0"}, 200),
        ("empty", b"", {}, 400),
        ("text", b"definitely not an image", {"Content-Type": "text/plain"}, 415),
        ("truncated_jpeg", photo[: len(photo) // 3], {}, 422),
        ("bomb_30000x30000", bytes(bomb), {}, 413),
        ("bad_threshold", photo, {"X-Threshold": "abc"}, 400),
    ] + [(kind, make(), {}, status) for kind, (make, status) in hostile.KINDS.items()]
    return good * max(1, round(4 * len(bad) / len(good))) + bad  # bad ones: about a fifth


def worker_pids(management: str, model: str) -> list[int]:
    info = http_client.get(f"{management}/models/{model}", timeout=10).json()[0]
    return sorted(w["pid"] for w in info["workers"] if w.get("pid", -1) > 0)


def worker_rss(management: str, model: str) -> int:
    info = http_client.get(f"{management}/models/{model}", timeout=10).json()[0]
    return sum(psutil.Process(w["pid"]).memory_info().rss for w in info["workers"] if w.get("pid", -1) > 0)


def run(
    inference: str,
    management: str,
    duration: float,
    concurrency: int,
    window: float,
    warmup: float,
    photo_dir: Path,
    model: str = "all",
    seed: int = 0,
    say: Say = say_flush,
) -> SoakResult:
    """``duration`` s of ``concurrency`` clients against the running server, windows of ``window`` s
    alternating clean and mixed, after ``warmup`` s of the same load; photos from ``photo_dir``."""
    mix = request_mix(sorted(Path(photo_dir).glob("*.jpg")))
    clean = [m for m in mix if m[0].startswith("photo:")]
    url = f"{inference}/predictions/{model}"
    lock = threading.Lock()

    def phase(elapsed: float) -> str:
        return "clean" if int(elapsed // window) % 2 == 0 else "mixed"

    def client(k: int, stop_at: float, t_ref: float, sink: list, alternate: bool) -> None:
        rnd, s = random.Random(seed + k), http_client.Session()
        while time.monotonic() < stop_at:
            pool = clean if alternate and phase(time.monotonic() - t_ref) == "clean" else mix
            name, body, headers, expected = rnd.choice(pool)
            t0 = time.monotonic()
            try:
                status = s.put(url, data=body, headers=headers, timeout=120).status_code
            except http_client.RequestException:
                status = -1  # connection error / timeout
            with lock:
                sink.append((t0 - t_ref, name, expected, status, time.monotonic() - t0))

    def start(seconds: float, sink: list, alternate: bool = False) -> list[threading.Thread]:
        stop_at, t_ref = time.monotonic() + seconds, time.monotonic()
        threads = [
            threading.Thread(target=client, args=(k, stop_at, t_ref, sink, alternate), daemon=True)
            for k in range(concurrency)
        ]
        for t in threads:
            t.start()
        return threads

    # Warm-up with the same mix and concurrency (so TorchServe forms the same batch sizes and the
    # allocator has seen every shape) before the memory baseline; its requests are not counted.
    for t in start(warmup, []):
        t.join()
    rss_start = worker_rss(management, model)
    pids = {tuple(worker_pids(management, model))}
    records: list[tuple[float, str, int, int, float]] = []  # (t, name, expected, status, latency)
    t_start, stop_at = time.monotonic(), time.monotonic() + duration
    threads = start(duration, records, alternate=True)
    windows, rss_series = [], [(0.0, rss_start)]
    next_report = window
    while any(t.is_alive() for t in threads):
        time.sleep(min(1.0, max(0.0, stop_at - time.monotonic()) + 0.1))
        elapsed = time.monotonic() - t_start
        if elapsed >= next_report or not any(t.is_alive() for t in threads):
            with lock:
                recent = [r for r in records if next_report - window <= r[0] < next_report]
            if not recent and not any(t.is_alive() for t in threads):
                break
            good = [r[4] * 1e3 for r in recent if r[2] == 200 and r[3] == 200]
            try:
                rss_series.append((elapsed, worker_rss(management, model)))
                pids.add(tuple(worker_pids(management, model)))
            except (http_client.RequestException, psutil.Error):
                pass
            w = {
                "t_end_s": round(min(next_report, elapsed), 1),
                "phase": phase(next_report - window),
                "bad_sent": sum(r[2] != 200 for r in recent),
                "requests": len(recent),
                "unexpected": sum(r[2] != r[3] for r in recent),
                "p50_ms": round(percentile(good, 50), 1),
                "p99_ms": round(percentile(good, 99), 1),
                "rss_mib": round(rss_series[-1][1] / 2**20, 1),
            }
            windows.append(w)
            say(
                f"[{w['t_end_s']:7.1f}s] {w['requests']:4d} req  unexpected {w['unexpected']}  "
                f"p50 {w['p50_ms']:7.1f} ms  p99 {w['p99_ms']:7.1f} ms  worker RSS {w['rss_mib']:.0f} MiB"
            )
            next_report += window
    for t in threads:
        t.join()
    rss_end = worker_rss(management, model)
    by_status = Counter(str(r[3]) for r in records)
    unexpected = Counter(f"{r[1]}: expected {r[2]}, got {r[3]}" for r in records if r[2] != r[3])
    good = [r[4] * 1e3 for r in records if r[2] == 200 and r[3] == 200]
    pids.add(tuple(worker_pids(management, model)))
    by_phase = {
        ph: [r[4] * 1e3 for r in records if r[2] == 200 and r[3] == 200 and phase(r[0]) == ph]
        for ph in ("clean", "mixed")
    }
    mixed_requests = [r for r in records if phase(r[0]) == "mixed"]
    p99 = {ph: round(percentile(v, 99), 1) for ph, v in by_phase.items()}
    return SoakResult(
        {
            "environment": environment(),
            "duration_s": duration,
            "concurrency": concurrency,
            "requests": len(records),
            "by_status": dict(sorted(by_status.items())),
            "by_input": dict(Counter(r[1] for r in records)),
            "unexpected_failures": sum(unexpected.values()),
            "unexpected_detail": dict(unexpected),
            "good_latency_ms": {
                "p50": round(percentile(good, 50), 1),
                "p99": round(percentile(good, 99), 1),
                "max": round(max(good, default=float("nan")), 1),
            },
            "worker_rss_mib": {
                "start": round(rss_start / 2**20, 1),
                "end": round(rss_end / 2**20, 1),
                "growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2),
            },
            "interleaved": {
                "window_s": window,
                "good_p99_ms": p99,
                "good_p50_ms": {ph: round(percentile(v, 50), 1) for ph, v in by_phase.items()},
                "p99_mixed_over_clean": round(p99["mixed"] / p99["clean"], 3) if p99["clean"] else None,
                "bad_share_of_mixed": round(sum(r[2] != 200 for r in mixed_requests) / max(len(mixed_requests), 1), 3),
            },
            "worker_restarts": len(pids) - 1,  # distinct worker PID sets seen, less the first
            "windows": windows,
        }
    )


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = report["windows"]
    t = [x["t_end_s"] for x in w]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot(t, [x["p50_ms"] for x in w], label="p50")
    a.plot(t, [x["p99_ms"] for x in w], label="p99")
    a.set_ylabel("latency of good requests (ms)")
    a.legend()
    a.set_title(
        f"soak: {report['requests']} requests, {report['unexpected_failures']} unexpected, "
        f"{report['worker_restarts']} restarts, concurrency {report['concurrency']} (shaded: mixed windows)"
    )
    for x in w:  # mixed windows (bad and hostile requests among the good) shaded
        if x.get("phase") == "mixed":
            for ax in (a, b):
                ax.axvspan(x["t_end_s"] - report["interleaved"]["window_s"], x["t_end_s"], color="0.9", lw=0)
    b.plot(t, [x["rss_mib"] for x in w], color="tab:red")
    b.set_ylabel("worker RSS (MiB)")
    b.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
