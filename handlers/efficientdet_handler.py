"""TorchServe handler for /predictions/all: three EfficientDet-D0 models answer every request.

Thin by design: it turns TorchServe's requests and context into multidet calls and back. All
image and model logic lives in the ``multidet`` package (packed into the MAR beside this file).
"""

import logging
import time
from http import HTTPStatus
from pathlib import Path

from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from multidet.config import Settings
from multidet.device import select_device
from multidet.errors import InputError
from multidet.pipeline import Detector
from multidet.serving import split_request

logger = logging.getLogger(__name__)


class EfficientDetHandler(BaseHandler):
    def initialize(self, context):
        t0 = time.perf_counter()
        props = context.system_properties
        settings = Settings.from_mapping((context.model_yaml_config or {}).get("handler"))
        device = select_device(settings.device, props.get("gpu_id"))
        model_dir = Path(props["model_dir"])
        self.detector = Detector.from_checkpoints(
            model_dir / settings.checkpoint_dir, settings, device, model_dir / settings.artifact_dir
        )
        warm = self.detector.warmup() if settings.warmup else None
        self.initialized = True
        logger.info(
            "loaded %s on %s with optimization=%s in %.1f s (warm request %s ms)",
            ",".join(self.detector.model_names),
            device,
            self.detector.runner.description,
            time.perf_counter() - t0,
            f"{warm:.0f}" if warm is not None else "skipped",
        )

    def preprocess(self, data):
        # How full TorchServe's batches are (a [METRICS] line in logs/ts_log.log)
        self.context.metrics.add_metric("RequestsPerBatch", len(data), "count", metric_type=MetricTypes.GAUGE)
        parsed, requests = [], len(self.context.request_processor or [])
        for idx, row in enumerate(data):
            try:
                # with a request envelope (KServe) rows are instances of one request: no headers each
                headers = self.context.get_all_request_header(idx) if idx < requests else {}
                parsed.append(split_request(row, self.detector.model_names, headers))
            except InputError as err:
                parsed.append(err)
        return parsed

    def inference(self, data, *args, **kwargs):
        good = [i for i, item in enumerate(data) if not isinstance(item, InputError)]
        results = list(data)
        outputs = self.detector.predict([data[i][0] for i in good], [data[i][1] for i in good])
        for i, out in zip(good, outputs):
            results[i] = out
        return results

    def postprocess(self, data):
        if len(data) != len(self.context.request_processor or []):
            # a request envelope (KServe v1: several "instances" in one request): one HTTP status
            # for the request, so any bad instance fails it with that instance's 4xx
            bad = next(((i, item) for i, item in enumerate(data) if isinstance(item, InputError)), None)
            if bad:
                raise PredictionException(f"instance {bad[0]}: {bad[1].message}", bad[1].status)
            return data
        responses = []
        for idx, item in enumerate(data):
            self.context.set_response_content_type(idx, "application/json")
            if isinstance(item, InputError):
                self.context.set_response_status(item.status, HTTPStatus(item.status).phrase, idx)
                responses.append(item.to_dict())
            else:
                responses.append(item)
        return responses
