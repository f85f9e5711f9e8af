"""What the service counts and times: one list of metrics, the same names and labels on both fronts.

Each front hands ``Metrics`` a sink that speaks its server's metric API: the TorchServe handler its
``context.metrics`` (the frontend exposes them on its metrics port, ``/metrics``, once ``metrics.yaml``
declares them: ``metrics_yaml`` writes that file from ``METRICS``), the Ray replica ``ray.serve.metrics``
(each node's metrics agent exposes them; Ray puts ``ray_`` before every name, and the scrape config in
``deploy/monitoring/`` takes it off, so a query reads the same on both fronts).

Labels are bounded: model names come from the set file, stages, routes and error types from this code,
status codes from HTTP. Nothing per request becomes a label value.

Histograms observe seconds (and counts) on TorchServe's buckets: its frontend builds every histogram with the
Prometheus client's default buckets and takes no others, so the Ray front uses the same ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import InputError

log = logging.getLogger(__name__)

# the Prometheus client's default buckets: TorchServe's frontend uses no others
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
STAGES = ("decode", "preprocess", "inference", "postprocess", "total")  # timing_ms; total: the image end to end


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter | histogram | gauge
    help: str
    labels: tuple[str, ...] = ()
    unit: str = "count"


METRICS = (
    Metric("multidet_model_images_total", "counter", "images each model answered", ("model",)),
    Metric(
        "multidet_model_inference_seconds",
        "histogram",
        "per image, the run of its batch's networks that gave this model's detections (models that share work run "
        "together: one figure for the models of one architecture)",
        ("model",),
        "seconds",
    ),
    Metric("multidet_model_detections_total", "counter", "detections above the threshold, per model", ("model",)),
    Metric(
        "multidet_model_detections",
        "histogram",
        "detections per image above the threshold, per model (on Ray its _sum is approximate: Ray records a bucket's "
        "middle; multidet_model_detections_total is exact)",
        ("model",),
    ),
    Metric(
        "multidet_stage_seconds",
        "histogram",
        "per image, each stage of the data path and the total (timing_ms)",
        ("stage",),
        "seconds",
    ),
    Metric("multidet_requests_total", "counter", "requests by front, route and status", ("front", "route", "status")),
    Metric("multidet_errors_total", "counter", "refused or failed images and requests, by error type", ("type",)),
    Metric("multidet_decoder_restarts_total", "counter", "decode children replaced (deadline, memory, crash)"),
    Metric("multidet_batch_images", "histogram", "images per run of the networks"),
    Metric(
        "multidet_queue_seconds",
        "histogram",
        "from a parsed request's arrival at the batcher to the start of its batch (Ray; TorchServe's own queue time is "
        "its ts_queue_latency_microseconds)",
        unit="seconds",
    ),
    Metric("multidet_info", "gauge", "what is served (value 1)", ("optimization", "models", "version")),
)
BY_NAME = {m.name: m for m in METRICS}


# TorchServe's frontend reads a metric line's labels as "name:value,name:value": a value keeps none of , : |
# (the same value on both fronts: "auto:onnxruntime" is "auto/onnxruntime", a list of models space-separated)
LABEL_VALUE = str.maketrans({",": " ", ":": "/", "|": "/"})

# a front's metric API: add to a counter, observe into a histogram or set a gauge (by metric.kind)
Sink = Callable[[Metric, float, Sequence[str]], None]


class Metrics:
    """Records what a front did in ``METRICS``' names through its sink."""

    def __init__(self, sink: Sink, front: str):
        self.sink = sink
        self.front = front
        self.restarts_seen = 0
        self.failed: set[str] = set()
        self.served: tuple[str, ...] = ()

    def _add(self, name: str, value: float, *labels: str) -> None:
        """Through the sink; a counter's 0 is not sent (Ray refuses it). A failing sink costs the figure, never the
        request: logged once per metric."""
        metric = BY_NAME[name]
        if metric.kind == "counter" and value == 0:
            return
        try:
            self.sink(metric, value, tuple(str(v).translate(LABEL_VALUE) for v in labels))
        except Exception:
            if name not in self.failed:
                self.failed.add(name)
                log.exception("metric %s could not be recorded (further failures of it not logged)", name)

    def info(self, optimization: str, models: Iterable[str], version: str) -> None:
        """What is served (value 1); set again by ``refresh``."""
        self.served = (optimization, " ".join(models), version)
        self._add("multidet_info", 1, *self.served)

    def request(self, route: str, status: int) -> None:
        """One HTTP request answered. ``route``: the route's template (never the raw path), its parameters written
        ``<name>`` (``/predictions/<model>``): Ray drops a label value with braces."""
        route = route.replace("{", "<").replace("}", ">")
        self._add("multidet_requests_total", 1, self.front, route, str(status))

    def refresh(self) -> None:
        """The info gauge set again (Ray drops a gauge that is not set again within two export intervals: its replica
        calls this with every health check)."""
        if self.served:
            self._add("multidet_info", 1, *self.served)

    def error(self, err: InputError) -> None:
        """A request refused as a whole (an image's error: ``results``)."""
        self._add("multidet_errors_total", 1, err.kind)

    def batch(self, images: int, queued_s: Sequence[float] = ()) -> None:
        if images:
            self._add("multidet_batch_images", images)
        for seconds in queued_s:
            self._add("multidet_queue_seconds", seconds)

    def answered(self, answered: Sequence[tuple[object, Sequence | None]], decoder: object, queued_s=()) -> None:
        """One batch as ``Detector.answer`` returned it (per request ``(request, results)``): its image count and
        queue waits, each image's figures, and the decoder's restarts so far (both fronts call this)."""
        good = sum(1 for _, results in answered for r in results or () if not isinstance(r, InputError))
        self.batch(good, queued_s)
        for _, results in answered:
            self.results(results or ())
        self.decoder(getattr(decoder, "restarts", 0))

    def results(self, results: Iterable[Mapping | InputError | None]) -> None:
        """Per image of a batch: its models' detections and times, or its error's type."""
        for result in results:
            if result is None:
                continue
            if isinstance(result, InputError):
                self._add("multidet_errors_total", 1, result.kind)
                continue
            timing = result["timing_ms"]
            for stage in STAGES:
                self._add("multidet_stage_seconds", timing[stage] / 1e3, stage)
            for model in result["models"]:
                self._add("multidet_model_images_total", 1, model["name"])
                self._add("multidet_model_detections_total", model["count"], model["name"])
                self._add("multidet_model_detections", model["count"], model["name"])
                self._add("multidet_model_inference_seconds", model["inference_ms"] / 1e3, model["name"])

    def decoder(self, restarts: int) -> None:
        """The decoder's restart count so far (``IsolatedDecoder.restarts``): what is new since the last call."""
        if restarts > self.restarts_seen:
            self._add("multidet_decoder_restarts_total", restarts - self.restarts_seen)
            self.restarts_seen = restarts


def metrics_yaml(ts_defaults: Mapping) -> dict:
    """TorchServe's metrics configuration: its own defaults (``ts_defaults``, the ``metrics.yaml`` TorchServe ships,
    its handler metrics HandlerTime and PredictionTime among them) and METRICS (TorchServe adds the label Hostname)."""
    model_metrics: dict[str, list] = {k: list(v) for k, v in ts_defaults.get("model_metrics", {}).items()}
    for m in METRICS:
        model_metrics.setdefault(m.kind, []).append({"name": m.name, "unit": m.unit, "dimensions": list(m.labels)})
    return {**{k: v for k, v in ts_defaults.items() if k != "model_metrics"}, "model_metrics": model_metrics}


HEADER = (
    "# TorchServe's metrics configuration (metrics_config in config.properties): its own defaults, and as\n"
    "# model_metrics the service's, written from multidet/metrics.py: python -m multidet.metrics > metrics.yaml\n"
)


def torchserve_metrics_yaml() -> dict:
    """``metrics_yaml`` of the metrics.yaml the installed TorchServe ships (the repository's metrics.yaml)."""
    from pathlib import Path

    import ts
    import yaml

    return metrics_yaml(yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text()))


def main() -> None:
    import yaml

    print(HEADER + yaml.safe_dump(torchserve_metrics_yaml(), sort_keys=False), end="")


if __name__ == "__main__":
    main()
