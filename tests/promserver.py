"""A real Prometheus (Debian's ``prometheus``) for the tests: started from deploy/monitoring/prometheus.yml with its
targets replaced and a 1 s scrape interval, queried over its HTTP API; and the handful of requests whose counts the
tests then ask it for."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import requests
import yaml

from helpers import ROOT, free_ports

MONITORING = ROOT / "deploy" / "monitoring"
EXAMPLE = ROOT / "docs" / "example.jpg"


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, list[str]]):
        """Prometheus scraping ``targets`` (job name in the shipped config -> host:port list) every second."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (apt-get install prometheus; .ci/run does)")
        config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(MONITORING / f) for f in config.get("rule_files", [])]
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        for name, hosts in targets.items():
            job = jobs[name]
            job.pop("file_sd_configs", None)
            job["static_configs"] = [{"targets": hosts}]
        config["scrape_configs"] = [jobs[name] for name in targets]
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self.up(targets):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Prometheus did not scrape {targets}: {(workdir / 'prometheus.log').read_text()}")
            time.sleep(0.5)

    def up(self, targets: dict[str, list[str]]) -> bool:
        try:
            return all(self.value(f'sum(up{{job="{job}"}})') == len(hosts) for job, hosts in targets.items())
        except requests.RequestException:
            return False

    def value(self, promql: str) -> float | None:
        """A query's one number (None: no series)."""
        r = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        r.raise_for_status()
        result = r.json()["data"]["result"]
        assert len(result) <= 1, f"{promql} gave {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def settled(self, queries: dict, quiet_s: float = 4.0, timeout: float = 120.0) -> dict:
        """Each query's value once none has changed for ``quiet_s`` (0 where there is no series)."""
        deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
        while time.monotonic() < deadline:
            values = {key: self.value(q) or 0.0 for key, q in queries.items()}
            if values != last:
                last, since = values, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return values
            time.sleep(0.5)
        raise TimeoutError(f"{queries} still changing after {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def handful(url: str, models: list[str]) -> tuple[Counter, list[tuple[str, dict]]]:
    """A few good and bad requests to ``url``/predictions/all; what Prometheus should count for them
    (``(metric, labels) -> n``) and each response's request id with its body."""
    body = EXAMPLE.read_bytes()
    expected: Counter = Counter()
    answers = []
    cases = [({}, body), ({"X-Request-Id": "prom-test-1"}, body), ({"X-Models": models[0]}, body), ({}, b"no image")]
    for headers, data in cases:
        r = requests.put(f"{url}/predictions/all", data=data, headers=headers, timeout=120)
        answer = r.json()
        answers.append((r.headers.get("x-request-id", ""), answer))
        expected["multidet_requests_total", f'status="{r.status_code}"'] += 1
        if r.status_code != 200:
            expected["multidet_errors_total", f'type="{answer["type"]}"'] += 1
            continue
        for m in answer["models"]:
            expected["multidet_model_images_total", f'model="{m["name"]}"'] += 1
            expected["multidet_model_detections_total", f'model="{m["name"]}"'] += m["count"]
    return expected, answers


def count_query(job: str, metric: str, labels: str) -> str:
    return f'sum({metric}{{job="{job}",{labels}}})'


def assert_counted(prom: Prometheus, job: str, url: str, models: list[str]) -> list[tuple[str, dict]]:
    """After ``handful`` requests to ``url``, Prometheus's per-model, per-status and per-error counts of ``job`` grew
    by what the answers say (each settled first: nothing else sends requests meanwhile); the answers."""
    keys = [
        (metric, f'model="{m}"')
        for m in models
        for metric in ("multidet_model_images_total", "multidet_model_detections_total")
    ]
    keys += [("multidet_requests_total", f'status="{s}",route="/predictions/<model>"') for s in (200, 415)]
    keys += [("multidet_errors_total", 'type="UnsupportedMediaType"')]
    queries = {key: count_query(job, *key) for key in keys}
    before = prom.settled(queries)
    expected, answers = handful(url, models)
    assert expected["multidet_model_images_total", f'model="{models[0]}"'] == 3
    after = prom.settled(queries)
    for metric, labels in keys:
        want = expected[metric, labels.split(",route=")[0]]
        assert after[metric, labels] - before[metric, labels] == want, (job, metric, labels, before, after)
    # an info gauge on Ray is exported while set (each request, each health check: every 5 s) and lives two export
    # intervals (the tests' 1 s): between, a scrape misses it, as any gauge a worker sets now and then
    served = f'job="{job}",models="{" ".join(models)}"'  # the whole set in one label value, as both fronts write it
    assert (prom.value(f"count(last_over_time(multidet_info{{{served}}}[30s]))") or 0) >= 1
    return answers
