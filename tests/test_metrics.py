"""What an operator sees: the service's metrics (multidet.metrics) scraped from a real TorchServe by a real
Prometheus and counted right, the alert rules checked and exercised by promtool, request ids in responses and
in the worker's log lines. (The Ray front's side: tests/test_ray.py.)"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import pytest
import yaml

from helpers import NAMES, ROOT
from multidet import tracing
from multidet.errors import BadRequest, InputError
from multidet.metrics import BY_NAME, METRICS, STAGES, Metrics, torchserve_metrics_yaml
from promserver import EXAMPLE, MONITORING, Prometheus, assert_counted


def test_torchserve_metrics_file_declares_every_metric():
    """config.properties' metrics_config declares exactly multidet.metrics' list (TorchServe drops undeclared ones)."""
    assert yaml.safe_load((ROOT / "metrics.yaml").read_text()) == torchserve_metrics_yaml(), (
        "metrics.yaml is stale: python -m multidet.metrics > metrics.yaml"
    )


def test_each_image_counts_per_model_per_stage_and_each_error_by_type(trained):
    """A batch of two good images and a bad one: per model images and detections as the answers say, every stage
    timed per image, the bad one counted by its type."""
    recorded = []
    metrics = Metrics(lambda metric, value, labels: recorded.append((metric.name, value, tuple(labels))), "test")
    results = trained.predict([EXAMPLE.read_bytes(), EXAMPLE.read_bytes(), b"not an image"])
    metrics.results(results)
    metrics.batch(2)

    def total(name: str, labels: tuple = ()) -> float:
        return sum(v for n, v, lb in recorded if n == name and lb == labels)

    def count(name: str, labels: tuple = ()) -> int:
        return sum(1 for n, _, lb in recorded if n == name and lb == labels)

    assert isinstance(results[2], InputError)
    for model in NAMES:
        assert total("multidet_model_images_total", (model,)) == 2
        found = sum(m["count"] for r in results[:2] for m in r["models"] if m["name"] == model)
        assert total("multidet_model_detections_total", (model,)) == found
        assert count("multidet_model_detections", (model,)) == count("multidet_model_inference_seconds", (model,)) == 2
    for stage in STAGES:
        assert count("multidet_stage_seconds", (stage,)) == 2
    assert total("multidet_errors_total", (results[2].kind,)) == 1
    assert total("multidet_batch_images") == 2
    assert {n for n, _, _ in recorded} <= set(BY_NAME)
    assert all(len(lb) == len(BY_NAME[n].labels) for n, _, lb in recorded)


def test_label_values_read_the_same_on_both_fronts():
    """TorchServe reads "name:value,name:value" from a metric line: no value may keep a comma, colon or bar."""
    recorded = []
    metrics = Metrics(lambda metric, value, labels: recorded.append(labels), "test")
    metrics.info("efficientdet_d0=auto:onnxruntime_stacked,efficientdet_d1=baseline", ["a", "b"], "1|2")
    assert recorded == [("efficientdet_d0=auto/onnxruntime_stacked efficientdet_d1=baseline", "a b", "1/2")]


def test_request_ids_are_bounded_and_carried_by_every_log_record(caplog):
    assert tracing.request_id({"x-request-id": "client-7.a:b"}) == "client-7.a:b"
    assert tracing.request_id({}, "made-by-front") == "made-by-front"
    assert len(tracing.request_id({})) == 32
    for bad in ("", "a b", "x" * 129, "-leading", "naïve"):
        with pytest.raises(BadRequest):
            tracing.request_id({"X-Request-Id": bad})
    tracing.install()
    log = logging.getLogger("multidet.test")
    with caplog.at_level(logging.INFO, logger="multidet.test"):
        with tracing.use(["id-1", "id-2"]):
            log.info("inside a batch")
        log.info("outside")
    inside, outside = caplog.records[-2:]
    assert inside.request_id == "id-1,id-2" and inside.getMessage() == "[request_id=id-1,id-2] inside a batch"
    assert outside.request_id == "" and outside.getMessage() == "outside"
    line = json.loads(tracing.JsonFormatter().format(inside))
    assert line["request_id"] == "id-1,id-2" and line["level"] == "INFO"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_alert_rules_check_and_fire_where_they_should():
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_dashboard_has_a_row_per_model_kind_of_panel_and_queries_known_metrics():
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    used = {name for name in BY_NAME for e in exprs if name in e}
    assert {"multidet_model_images_total", "multidet_model_detections_total", "multidet_errors_total"} <= used
    assert any("multidet_model_inference_seconds_bucket" in e and "0.99" in e for e in exprs)
    assert any(v["name"] == "model" for v in board["templating"]["list"])
    assert any(p["type"] == "row" and p.get("repeat") == "model" for p in board["panels"])  # a row per model
    assert all(m.name in (MONITORING / "grafana-dashboard.json").read_text() for m in METRICS if m.labels == ("model",))


@pytest.mark.integration
def test_prometheus_counts_torchserve_per_model(server, tmp_path):
    """A real Prometheus scraping the suite's TorchServe: after a handful of requests (good, one model only, not an
    image) its per-model, per-status and per-error counts grew by what the answers say; the ids find log lines."""
    prom = Prometheus(tmp_path / "prometheus", {"torchserve": [server.metrics.split("//", 1)[1]]})
    try:
        answers = assert_counted(prom, "torchserve", server.inference, list(NAMES))
        assert prom.value('count(last_over_time(multidet_info{job="torchserve",optimization="baseline"}[30s]))') == 1
    finally:
        prom.stop()
    # the JSON's request_id finds the worker's log line of that request; the header is TorchServe's own id
    logs = "".join(p.read_text(errors="replace") for p in (server.workdir / "logs").glob("model_log*.log"))
    assert answers[1][1]["request_id"] == "prom-test-1"
    for header_id, body in answers:
        assert f"[request_id={body['request_id']}]" in logs
        assert header_id and (header_id == body["request_id"] or body["request_id"] == "prom-test-1")


def test_manifests_point_prometheus_at_both_fronts_with_the_same_names():
    """Every pod of both fronts is scraped on its metrics port (annotations; the operator's PodMonitors), and every
    Ray scrape (prometheus.yml, the Ray PodMonitor) renames ray_multidet_* to the names TorchServe exports."""
    k8s = ROOT / "deploy" / "k8s"
    torchserve = yaml.safe_load((k8s / "deployment.yaml").read_text())["spec"]["template"]["metadata"]["annotations"]
    assert torchserve["prometheus.io/scrape"] == "true" and torchserve["prometheus.io/port"] == "8082"
    ray = yaml.safe_load((k8s / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    groups = [ray["headGroupSpec"], *ray["workerGroupSpecs"]]
    for group in groups:
        port = group["rayStartParams"]["metrics-export-port"]
        annotations = group["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == port
    monitors = {d["metadata"]["name"]: d for d in yaml.safe_load_all((MONITORING / "podmonitors.yaml").read_text())}
    scrape = {j["job_name"]: j for j in yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]}
    (ray_relabel,) = monitors["multidet-ray"]["spec"]["podMetricsEndpoints"][0]["metricRelabelings"]
    (scrape_relabel,) = scrape["ray"]["metric_relabel_configs"]
    assert ray_relabel["regex"] == scrape_relabel["regex"] == "ray_(multidet_.*)"
    assert ray_relabel["replacement"] == scrape_relabel["replacement"] == "$1"
    assert monitors["multidet-ray"]["spec"]["podMetricsEndpoints"][0]["targetPort"] == int(port)
    assert "metricRelabelings" not in monitors["multidet-torchserve"]["spec"]["podMetricsEndpoints"][0]
