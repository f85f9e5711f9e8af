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

from multidet.config import Settings
from multidet.device import select_device
from multidet.envelopes import parse_request
from multidet.errors import BadRequest
from multidet.pipeline import Detector
from multidet.tsconfig import busy_dir

logger = logging.getLogger(__name__)

DESCRIBE = object()  # a request asking for the model's description (TorchServe's describe header)


class EfficientDetHandler(BaseHandler):
    def initialize(self, context):
        t0 = time.perf_counter()
        props = context.system_properties
        settings = Settings.from_mapping((context.model_yaml_config or {}).get("handler"))
        device = select_device(settings.device, props.get("gpu_id"))
        model_dir = Path(props["model_dir"])
        self.detector = Detector.from_model_set(
            model_dir / settings.model_set, settings, device, model_dir / settings.artifact_dir
        )
        atexit.register(self.detector.close)  # TorchServe has no unload hook: the worker's exit ends the decode child
        self.busy_marker = self.marker_for(context)
        warm = self.detector.warmup() if settings.warmup else None
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
        """Per request: its format and instances (multidet.envelopes), DESCRIBE, or the InputError it is."""
        # How full TorchServe's batches are (a [METRICS] line in logs/ts_log.log)
        self.context.metrics.add_metric("RequestsPerBatch", len(data), "count", metric_type=MetricTypes.GAUGE)
        settings = self.detector.settings
        out = []
        for idx, row in enumerate(data):
            headers = self.context.get_all_request_header(idx) or {}
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
        return self.detector.answer(data)

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
            self.context.set_response_content_type(idx, "application/json")
            if status != 200:
                self.context.set_response_status(status, HTTPStatus(status).phrase, idx)
            responses.append(body)
        return responses
