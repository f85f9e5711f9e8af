"""Embedded mode: the TorchServe handler in-process, through the same ``handle()`` path as the server.

It builds TorchServe's own ``ts.context.Context`` (with the metrics cache the worker uses), loads
``handlers/efficientdet_handler.py`` and feeds it request dicts shaped exactly as the worker does,
so ``scripts/predict.py``, the benchmarks and the tests see what a client of the server sees.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import ts
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from multidet.config import Settings
from multidet.metrics import torchserve_metrics_yaml


@dataclass
class EmbeddedRequest:
    body: bytes
    params: Mapping[str, str] = field(default_factory=dict)  # query parameters / form fields
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. {"X-Threshold": "0"}
    field_name: str = "body"  # "body" for a raw PUT, else multipart field


@dataclass
class EmbeddedResponse:
    status: int
    body: dict

    def json(self) -> dict:
        return self.body


def load_handler_class(path: Path):
    spec = importlib.util.spec_from_file_location("efficientdet_handler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EfficientDetHandler


class EmbeddedService:
    def __init__(
        self,
        settings: Settings,
        model_dir: Path | str,
        handler_path: Path,
        batch_size: int = 1,
        model_name: str = "all",
    ):
        # TorchServe's metrics declaration with the service's (as metrics.yaml: multidet.metrics.metrics_yaml)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(torchserve_metrics_yaml(), f)
        metrics = MetricsCacheYamlImpl(config_file_path=f.name)
        metrics.initialize_cache()
        os.unlink(f.name)
        metrics.set_request_ids(str(uuid.uuid4()))
        self.context = Context(
            model_name,
            str(model_dir),
            {"model": {"modelName": model_name}},
            batch_size,
            0 if torch.cuda.is_available() else None,
            ts.__version__,
            True,
            metrics,
            {"handler": settings.to_mapping()},
        )
        self.handler = load_handler_class(handler_path)()
        self.handler.initialize(self.context)

    @property
    def detector(self):
        return self.handler.detector

    def predict(self, requests: Sequence[EmbeddedRequest]) -> list[EmbeddedResponse]:
        """Run one batch as TorchServe's worker would; one response per request."""
        rows, headers = [], []
        for req in requests:
            rows.append({req.field_name: req.body, **{k: str(v) for k, v in req.params.items()}})
            headers.append(RequestProcessor(dict(req.headers)))
        ids = {i: str(uuid.uuid4()) for i in range(len(rows))}
        self.context.request_ids = ids
        self.context.request_processor = headers
        self.context.metrics.request_ids = ids
        out = self.handler.handle(rows, self.context)
        # TorchServe's worker json.dumps what the handler returns; so do we, and parse it back
        return [
            EmbeddedResponse(self.context.get_response_status(i)[0], json.loads(json.dumps(body)))
            for i, body in enumerate(out)
        ]

    def predict_one(
        self, body: bytes, params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None
    ) -> EmbeddedResponse:
        return self.predict([EmbeddedRequest(body, dict(params or {}), dict(headers or {}))])[0]
