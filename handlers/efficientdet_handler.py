"""TorchServe handler for /predictions/all: every model of the archive's model set answers every request.

Thin by design: it turns TorchServe's requests and context into multidet calls and back. All
image and model logic lives in the ``multidet`` package (packed into the MAR beside this file).
"""

import atexit
import contextlib
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path

from ts.handler_utils.timer import timed
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from multidet import tracing
from multidet.config import Settings
from multidet.device import select_device
from multidet.envelopes import parse_request
from multidet.errors import BadRequest, InputError
from multidet.metrics import Metric, Metrics
from multidet.pipeline import Detector
from multidet.tsconfig import busy_dir

logger = logging.getLogger(__name__)

DESCRIBE = object()  # a request asking for the model's description (TorchServe's describe header)
ROUTE = "/predictions/{model}"  # what reaches a handler (TorchServe's frontend answers its other routes itself)


class EfficientDetHandler(BaseHandler):
    def initialize(self, context):
        t0 = time.perf_counter()
        props = context.system_properties
        settings = Settings.from_mapping((context.model_yaml_config or {}).get("handler"))
        tracing.install(json_lines=settings.log_format == "json")
        device = select_device(settings.device, props.get("gpu_id"))
        model_dir = Path(props["model_dir"])
        self.detector = Detector.from_model_set(
            model_dir / settings.model_set, settings, device, model_dir / settings.artifact_dir
        )
        atexit.register(self.detector.close)  # TorchServe has no unload hook: the worker's exit ends the decode child
        self.busy_marker = self.marker_for(context)
        warm = self.detector.warmup() if settings.warmup else None
        cache = context.metrics  # the worker's (declared in metrics.yaml); the frontend's metrics port shows them

        def sink(metric: Metric, value: float, labels) -> None:
            cache.get_metric(metric.name, MetricTypes[metric.kind.upper()]).add_or_update(value, list(labels))

        self.metrics = Metrics(sink, "torchserve")
        version = (getattr(context, "manifest", None) or {}).get("model", {}).get("modelVersion", "")
        self.metrics.info(self.detector.description, self.detector.model_names, str(version))
        self.initialized = True
        logger.info(
            "loaded %s on %s with optimization=%s in %.1f s (warm request %s ms)",
            ",".join(self.detector.model_names),
            device,
            self.detector.description,
            time.perf_counter() - t0,
            f"{warm:.0f}" if warm is not None else "skipped",
        )

    def handle(self, data, context):
        """Every request of TorchServe's batch on its own: BaseHandler.handle reads only the first request's
        ``describe``/``explain`` header and answers the whole batch by it; here each request's own header
        decides its own answer (a description, a 400 for explanations, or its detections)."""
        t0 = time.time()
        self.context = context
        with self.busy():
            output = self.postprocess(self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", round((time.time() - t0) * 1000, 2), None, "ms")
        return output

    @contextlib.contextmanager
    def busy(self):
        """While a batch is handled, this worker's marker exists (``busy_marker``): a draining server, or an
        update unregistering this version, waits until no worker is inside the handler."""
        marker = self.busy_marker
        if marker is not None:
            marker.touch()
        try:
            yield
        finally:
            if marker is not None:
                marker.unlink(missing_ok=True)

    @staticmethod
    def marker_for(context) -> Path | None:
        """``<model>-<version>-<pid>`` in the busy folder (multidet.tsconfig.busy_dir), its folder made once;
        None where it cannot be written (a read-only /tmp: no markers, nothing else changes)."""
        model = (getattr(context, "manifest", None) or {}).get("model", {})
        marker = busy_dir() / f"{model.get('modelName', 'model')}-{model.get('modelVersion', '0')}-{os.getpid()}"
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        return marker

    def describe_handle(self):
        """``GET /models/all?customized=true``: the model set this worker serves."""
        return self.detector.describe()

    @timed
    def preprocess(self, data):
        """Per request: its format and instances (multidet.envelopes), DESCRIBE, or the InputError it is; its
        request id (``self.request_ids``: the client's X-Request-Id, else TorchServe's own id of the request)."""
        settings = self.detector.settings
        out, self.request_ids, self.started = [], [], time.perf_counter()
        for idx, row in enumerate(data):
            headers = self.context.get_all_request_header(idx) or {}
            try:
                self.request_ids.append(tracing.request_id(headers, self.context.get_request_id(idx)))
            except BadRequest as err:
                self.request_ids.append(self.context.get_request_id(idx))
                out.append(err)
                continue
            if headers.get("describe") == "True":
                out.append(DESCRIBE)
            elif headers.get("explain") == "True":
                out.append(BadRequest("this model gives no explanations; ask /predictions/all for its detections"))
            else:
                out.append(
                    parse_request(
                        row,
                        headers,
                        self.detector.model_names,
                        settings.max_instances,
                        settings.max_request_pixels,
                        settings.decode_limits,
                    )
                )
        return out

    @timed
    def inference(self, data, *args, **kwargs):
        """Every good instance of the batch in one Detector.predict call; per request (request, results)."""
        with tracing.use(self.request_ids):
            answered = self.detector.answer(data)
        self.metrics.answered(answered, self.detector.decoder)
        return answered

    @timed
    def postprocess(self, data):
        """Per request: its envelope's HTTP status and JSON body (an error: its 4xx and the message)."""
        responses = []
        for idx, (request, results) in enumerate(data):
            if request is DESCRIBE:
                status, body = 200, self.describe_handle()
            elif results is None:
                status, body = request.status, request.to_dict()
            else:
                status, body = request.format(results)
            # the JSON's request_id: the client's X-Request-Id, else TorchServe's own id of the request, which its
            # frontend always puts in the response's x-request-id header (it overwrites the handler's)
            request_id, own = self.request_ids[idx], self.context.get_request_id(idx)
            if isinstance(body, dict):
                body = {**body, "request_id": request_id}
            self.context.set_response_content_type(idx, "application/json")
            if status != 200:
                self.context.set_response_status(status, HTTPStatus(status).phrase, idx)
            self.metrics.request(ROUTE, status)
            if isinstance(request, InputError):
                self.metrics.error(request)
            with tracing.use([request_id]):
                ms = (time.perf_counter() - self.started) * 1e3
                also = f" (torchserve id {own})" if own != request_id else ""
                logger.info("%s %d in %.1f ms%s", ROUTE, status, ms, also)
            responses.append(body)
        return responses
