"""TorchServe handler for /predictions/all: every model of the archive's model set answers every request.

Thin by design: it turns TorchServe's requests and context into multidet calls and back. All
image and model logic lives in the ``multidet`` package (packed into the MAR beside this file).
"""

import logging
import time
from http import HTTPStatus
from pathlib import Path

from ts.handler_utils.timer import timed
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from multidet.config import Settings
from multidet.device import select_device
from multidet.envelopes import ParsedRequest, parse_request
from multidet.errors import InputError
from multidet.pipeline import Detector

logger = logging.getLogger(__name__)


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

    @timed
    def preprocess(self, data):
        """Per request: its format and instances (multidet.envelopes), or the InputError it is."""
        # How full TorchServe's batches are (a [METRICS] line in logs/ts_log.log)
        self.context.metrics.add_metric("RequestsPerBatch", len(data), "count", metric_type=MetricTypes.GAUGE)
        return [
            parse_request(
                row,
                self.context.get_all_request_header(idx),
                self.detector.model_names,
                self.detector.settings.max_instances,
            )
            for idx, row in enumerate(data)
        ]

    @timed
    def inference(self, data, *args, **kwargs):
        """Every good instance of the batch in one Detector.predict call; per request (request, results)."""
        requests = [r for r in data if isinstance(r, ParsedRequest)]
        good = [item for r in requests for item in r.instances if not isinstance(item, InputError)]
        outputs = iter(self.detector.predict([body for body, _ in good], [opts for _, opts in good]))
        return [
            (r, [item if isinstance(item, InputError) else next(outputs) for item in r.instances])
            if isinstance(r, ParsedRequest)
            else (r, None)
            for r in data
        ]

    @timed
    def postprocess(self, data):
        """Per request: its envelope's HTTP status and JSON body (an error: its 4xx and the message)."""
        responses = []
        for idx, (request, results) in enumerate(data):
            status, body = (request.status, request.to_dict()) if results is None else request.format(results)
            self.context.set_response_content_type(idx, "application/json")
            if status != 200:
                self.context.set_response_status(status, HTTPStatus(status).phrase, idx)
            responses.append(body)
        return responses
