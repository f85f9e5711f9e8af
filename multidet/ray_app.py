"""The Ray Serve front: the same model set, data path, request formats and errors as the TorchServe handler,
on a Ray cluster (one machine or many), speaking the project's routes and the Open Inference Protocol.

A thin front like ``handlers/efficientdet_handler.py``: HTTP requests become the handler's rows
(``envelopes.torchserve_value``) or OIP requests (``multidet.oip``); a ``@serve.batch`` method runs each
batch through ``Detector.answer``; the envelopes format the answers. Routes:

    PUT|POST /predictions/<name>          raw body, multipart form, KServe v1 JSON (as on TorchServe)
    POST     /v1/models/<name>:predict    KServe v1
    GET      /ping                        {"status": "Healthy"} once the replica is loaded
    GET      /v2, /v2/health/live, /v2/health/ready, /v2/models/<name>, /v2/models/<name>/ready
    POST     /v2/models/<name>/infer      OIP v2 (JSON or the binary-data extension)

Start it with ``make serve-ray`` (``scripts/serve_ray.py``), or on any Ray cluster with Ray's own tools:
``serve run multidet.ray_app:build model_set=/abs/models.yaml optimization=auto`` or a Serve config whose
``import_path`` is ``multidet.ray_app:build`` and whose ``args`` are ``RayFront``'s fields (KubeRay:
deploy/k8s/rayservice.yaml).
"""

import asyncio
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, tracing
from .config import ConfigError, Settings
from .device import select_device
from .envelopes import parse_request, torchserve_value
from .errors import (
    BadRequest,
    HeadersTooLarge,
    InputError,
    MethodNotAllowed,
    NotFound,
    ProcessingFailed,
    RequestTooLarge,
    RouteNotFound,
    ServiceBusy,
)
from .metrics import BUCKETS, METRICS, Metric, Metrics
from .oip import error_body, model_metadata, parse_infer, server_metadata
from .pipeline import Detector

log = logging.getLogger(__name__)

# Ray starts its worker processes, Serve's replicas among them, at niceness 15 (its worker_niceness
# setting): beside any other busy process a replica then gets a fraction of a core (measured here: a
# replica at 15 beside a training run at 19 got ~70 % of one core). Serving processes run at 0; a
# cluster started by this project (serve_ray.py, the tests, the experiments) sets it, and the RayService
# manifest sets it in its pods.
# Token authentication on: without it anyone who reaches the GCS or the dashboard runs any code on the cluster
# (its Jobs API; CVE-2023-48022). Every process of a cluster and every client needs the token (README "Security").
RAY_ENV = {"RAY_worker_niceness": "0", "RAY_AUTH_MODE": "token"}


def serving_environment() -> None:
    """Set RAY_ENV in this process's environment (inherited by the Ray cluster it starts), unless set (an explicit
    ``RAY_AUTH_MODE=disabled`` stays), and with token authentication make sure there is a token: ``RAY_AUTH_TOKEN``,
    the file ``RAY_AUTH_TOKEN_PATH`` names, else Ray's default file, written here (mode 0600) where it is missing."""
    changed = [key for key in RAY_ENV if key not in os.environ]
    for key in changed:
        os.environ[key] = RAY_ENV[key]
    if "RAY_AUTH_MODE" in changed:
        # Ray read its configuration when it was imported (above): read again, as Ray itself does where it turns
        # token authentication on (ray._private.authentication), or this process's own ray.init sends no token
        from ray._raylet import Config

        Config.initialize("")
    if os.environ["RAY_AUTH_MODE"].lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")  # Ray's default
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
    except FileExistsError:  # another process made it meanwhile: theirs is the token
        return
    log.info("made a Ray authentication token in %s", path)


@dataclass(frozen=True)
class RayFront:
    """The Ray front's settings: the handler's ``Settings`` (``settings``) plus how Ray runs it. Each is an
    ``args`` key of ``build`` (a Serve config's ``args:``), flat: Settings' keys and these in one mapping."""

    model_set: str = "models.yaml"  # the model set file (absolute on a cluster: every node must have it)
    name: str = "all"  # the endpoint: /predictions/<name>, /v2/models/<name>
    version: str = "1"
    artifact_dir: str | None = None  # an optimization's build files (default: the cache, built at load)
    settings: Settings = field(default_factory=Settings)
    # replicas: a fixed count, or autoscaling between min_replicas and max_replicas (max_replicas > 0)
    num_replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 0
    target_ongoing_requests: float = 2.0  # autoscaling's target per replica
    num_cpus: float = 1.0  # Ray CPUs reserved per replica (its share of a node)
    threads: int = 0  # torch threads per replica (0: num_cpus rounded up)
    max_replicas_per_node: int = 0  # 0: no limit
    # batching (@serve.batch): like TorchServe's batchSize / maxBatchDelay
    max_batch_size: int = 4
    batch_wait_s: float = 0.05
    # per replica, in flight at once: admitted, a request waits in the replica for its batch, and the replica's event
    # loop (inference runs on its own thread) answers the health routes meanwhile; past it requests wait in Ray's router
    max_ongoing_requests: int = 128
    max_queued_requests: int = 100  # waiting per caller beyond max_ongoing_requests; past it 503
    # waiting longer for its batch to start: 503 + Retry-After, never computed (0: no bound)
    max_queue_wait_s: float = 30.0
    max_request_size: int = 16 * 1024 * 1024  # bytes; larger bodies get 413 (TorchServe's max_request_size)
    # a redeploy starts the new replicas before it stops the old (no request lost); it needs room for them
    # beside the old ones (num_cpus each): on a full cluster set 0 (replicas replaced 20 % at a time)
    max_surge_percent: int = 100

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.min_replicas < 0 or self.max_replicas < 0:
            raise ConfigError("num_replicas must be >= 1, min_replicas and max_replicas >= 0")
        if self.max_replicas and self.max_replicas < max(self.min_replicas, 1):
            raise ConfigError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        if self.num_cpus <= 0 or self.threads < 0 or self.max_batch_size < 1 or self.batch_wait_s < 0:
            raise ConfigError("num_cpus must be > 0, threads >= 0, max_batch_size >= 1, batch_wait_s >= 0")
        if self.max_queue_wait_s < 0:
            raise ConfigError(f"max_queue_wait_s must be >= 0, got {self.max_queue_wait_s}")
        if self.max_ongoing_requests < 1 or self.max_request_size < 1:
            raise ConfigError("max_ongoing_requests and max_request_size must be >= 1")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "RayFront":
        """Flat ``args`` -> RayFront; unknown keys are errors (ConfigError naming them)."""
        values = dict(values or {})
        own = {f.name: f for f in fields(cls) if f.name != "settings"}
        known_settings = {f.name for f in fields(Settings)}
        unknown = sorted(set(values) - set(own) - known_settings)
        if unknown:
            raise ConfigError(f"unknown Ray front setting(s) {unknown}; known: {sorted(set(own) | known_settings)}")
        # a key of both left None (the front's artifact_dir: the cache) keeps Settings' own default
        shared = {k: v for k, v in values.items() if k in known_settings and not (k in own and v is None)}
        settings = Settings.from_mapping(shared)
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in own:
                continue
            default = getattr(cls, key)
            try:
                kwargs[key] = raw if raw is None or default is None else type(default)(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"setting {key}={raw!r}: {exc}") from exc
        return cls(settings=settings, **kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """The flat ``args`` that ``from_mapping`` reads back to the same front. A key both types have
        (``model_set``, ``artifact_dir``) is the front's: Settings' ``artifact_dir`` is an archive's
        relative folder, and a replica given it would build into its working directory, not the cache."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "settings"}
        return {**self.settings.to_mapping(), **out}

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(-(-self.num_cpus // 1)))

    def deployment_options(self) -> dict[str, Any]:
        """What ``serve.deployment(...).options`` takes for these settings."""
        opts: dict[str, Any] = {
            "name": "multidet",
            "ray_actor_options": {"num_cpus": self.num_cpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "max_surge_percent": self.max_surge_percent,
            "health_check_period_s": 5,
            "graceful_shutdown_wait_loop_s": 1,
        }
        if self.max_replicas:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            opts["num_replicas"] = self.num_replicas
        if self.max_replicas_per_node:
            opts["max_replicas_per_node"] = self.max_replicas_per_node
        return opts


async def read_limited(stream: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The whole body, refused (413) past ``limit`` bytes: from Content-Length at once, else while reading."""
    message = f"the request body is larger than {limit} bytes (setting max_request_size)"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(message)
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(message)
        chunks.append(chunk)
    return b"".join(chunks)


async def form_row(body: bytes, headers: Mapping[str, str]) -> dict[str, object]:
    """A multipart or url-encoded form -> the row TorchServe's worker would hand the handler."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import FormParser, MultiPartParser

    async def once() -> AsyncIterator[bytes]:
        yield body
        yield b""

    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    parser = MultiPartParser(headers, once()) if kind == "multipart/form-data" else FormParser(headers, once())
    form = await parser.parse()
    row: dict[str, object] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            row[key] = torchserve_value(await value.read(), value.content_type)
        else:
            row[key] = value
    return row


api = FastAPI(title="multidet", docs_url=None, redoc_url=None)


MAX_HEADER_BYTES = 8192  # a request's headers together, as TorchServe's frontend bounds them (netty's 8 KiB)


# this process's replica's metrics (one replica a process: Ray runs each in an actor of its own); None before it loads
replica_metrics: Metrics | None = None


def replica_setup(front: RayFront) -> Metrics:
    """What a replica sets in its process (Serve ships the deployment class by value, with its own copy of this
    module's globals: module state is set here, in the module itself): the request ids on every log record, the
    package's log lines in the replica's log (Ray Serve's handlers, at INFO), this process's metrics."""
    global replica_metrics
    tracing.install(json_lines=front.settings.log_format == "json")
    package, serve_log = logging.getLogger(__name__.split(".")[0]), logging.getLogger("ray.serve")
    for handler in serve_log.handlers:
        if handler not in package.handlers:
            package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = not serve_log.handlers
    replica_metrics = ray_metrics()
    return replica_metrics


def ray_metrics() -> Metrics:
    """multidet.metrics through ``ray.serve.metrics`` (each node's metrics agent exposes them, as ray_<name>)."""
    from ray.serve import metrics as serve_metrics

    kinds = {"counter": serve_metrics.Counter, "histogram": serve_metrics.Histogram, "gauge": serve_metrics.Gauge}
    made = {}
    for m in METRICS:
        extra = {"boundaries": list(BUCKETS)} if m.kind == "histogram" else {}
        made[m.name] = kinds[m.kind](m.name, description=m.help, tag_keys=m.labels, **extra)

    def sink(metric: Metric, value: float, labels) -> None:
        made_metric, tags = made[metric.name], dict(zip(metric.labels, labels))
        if metric.kind == "counter":
            made_metric.inc(value, tags)
        elif metric.kind == "histogram":
            made_metric.observe(value, tags)
        else:
            made_metric.set(value, tags)

    return Metrics(sink, "ray")


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A JSON answer; an object gets the request's id (``request_id``, as on TorchServe)."""
    ids = tracing.current()
    if isinstance(body, dict) and ids:
        body = {**body, "request_id": ids[0]}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def error(err: InputError, oip: bool = False) -> JSONResponse:
    if replica_metrics is not None:
        replica_metrics.error(err)
    return json_response(error_body(err) if oip else err.to_dict(), err.status)


def is_oip(request: Request) -> bool:
    return request.url.path.startswith("/v2")


@api.exception_handler(StarletteHTTPException)
async def routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, a method the route does not take) in the project's words."""
    if exc.status_code == 404:
        err: InputError = RouteNotFound(f"no route {request.url.path}; see README (Ray Serve) for the routes")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        err = BadRequest(str(exc.detail))
        err.status = exc.status_code
    return error(err, is_oip(request))


def serve_request_id() -> str | None:
    """Ray Serve's id of the request being handled (the client's X-Request-Id where given, else one it made)."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # outside a replica's request (unit tests of the app)
        return None


@api.middleware("http")
async def front_door(request: Request, call_next):
    """Around every request: its id (multidet.tracing: the client's X-Request-Id, validated, else Ray's own) in the
    response's header and JSON and in every log line meanwhile; headers over MAX_HEADER_BYTES together refused (431)
    before any route reads them (Ray's proxy takes far more); the request counted by route and status, and logged."""
    t0 = time.perf_counter()
    made = serve_request_id()
    try:
        request_id, err = tracing.request_id(request.headers, made), None
    except InputError as bad:  # Ray's proxy took the client's bad id as its own and echoes it in its header
        request_id, err = tracing.request_id({}), bad
    size = sum(len(name) + len(value) + 4 for name, value in request.headers.raw)
    if size > MAX_HEADER_BYTES:
        err = HeadersTooLarge(f"the request's headers take {size} bytes; at most {MAX_HEADER_BYTES}")
    with tracing.use([request_id]):
        response = error(err, is_oip(request)) if err is not None else await call_next(request)
        # the template of the route it took (a bounded label, never the raw path); unrouted (refused before): unknown
        template = getattr(request.scope.get("route"), "path", "unknown")
        if made is None:  # Ray's proxy puts its own id (this one) in the response's x-request-id
            response.headers[tracing.HEADER] = request_id
        if replica_metrics is not None:
            replica_metrics.request(template, response.status_code)
        log.info("%s %d in %.1f ms", template, response.status_code, (time.perf_counter() - t0) * 1e3)
    return response


def not_found(name: str, oip: bool = False) -> JSONResponse:
    return error(NotFound(f"Model not found: {name}"), oip)


@dataclass(eq=False)
class Pending:
    """A parsed request on its way to a batch."""

    parsed: Any
    arrived: float  # time.perf_counter() when it reached the batcher
    request_id: str
    started: bool = False  # its batch began: it is computed and answered
    expired: bool = False  # it waited past max_queue_wait_s, or its client left: skipped by its batch


@serve.deployment
@serve.ingress(api)
class MultiDet:
    def __init__(self, config: Mapping[str, Any]):
        self.front = front = RayFront.from_mapping(config)
        self.metrics = replica_setup(front)
        # all of the replica's torch work, its loading and warm-up included, runs on this one thread, as in TorchServe's
        # worker (its main thread). OpenMP gives each thread that starts parallel work a team of its own; with two
        # teams on 2 cores libgomp counts more threads than CPUs and stops spinning between parallel regions, and
        # every layer pays a sleep and a wake-up: loading on the replica's thread and inferring on another cost ~15 %
        # of the pipeline's time (docs/benchmarks.md 8c). Through asyncio's default pool successive batches even
        # landed on different threads (8b).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multidet-batch")
        self.waiting: set[Pending] = set()  # admitted, their batch not begun
        self.batch_s = 0.0  # the last batch's seconds (Retry-After's estimate)
        warm = self.executor.submit(self.load).result()
        self.run_batch.set_max_batch_size(front.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(front.batch_wait_s)
        self.metrics.info(self.detector.description, self.detector.model_names, front.version)
        log.info(
            "replica pid %d: %s on %s, %s, %d thread(s), warm request %s ms",
            os.getpid(),
            ",".join(self.detector.model_names),
            self.detector.device,
            self.detector.description,
            front.torch_threads,
            f"{warm:.0f}" if warm is not None else "skipped",
        )

    def load(self) -> float | None:
        """The Detector, on the inference thread; the warm-up request's ms (None: skipped)."""
        import torch

        front = self.front
        torch.set_num_threads(front.torch_threads)  # OpenMP's thread count is the calling thread's setting
        device = select_device(front.settings.device)
        self.detector = Detector.from_model_set(
            front.model_set, front.settings, device, Path(front.artifact_dir) if front.artifact_dir else None
        )
        return self.detector.warmup() if front.settings.warmup else None

    def check_health(self) -> None:
        """Ray Serve's health check (every health_check_period_s): sets the info gauge again, as Ray exports a gauge
        only while it is set."""
        self.metrics.refresh()

    def __del__(self) -> None:
        """Ray Serve's shutdown hook of a replica: the Detector's decode child ends with it."""
        detector = getattr(self, "detector", None)
        if detector is not None:
            detector.close()
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.shutdown(wait=False)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def run_batch(self, items: list) -> list:
        """Requests of several HTTP calls (``Pending``), their images in one Detector.predict (in a thread: the event
        loop keeps taking requests and answering health checks); per request (its results, the batch's image count),
        ``(None, 0)`` for one that expired before its batch began (not computed)."""
        live = [it for it in items if not it.expired]
        for it in live:
            it.started = True
            self.waiting.discard(it)
        if not live:
            return [(None, 0)] * len(items)
        requests = [it.parsed for it in live]

        def work() -> tuple[float, list]:
            with tracing.use([it.request_id for it in live]):
                return time.perf_counter(), self.detector.answer(requests)

        started, answered = await asyncio.get_running_loop().run_in_executor(self.executor, work)
        self.batch_s = time.perf_counter() - started
        images = sum(len(r.instances) for r in requests)
        self.metrics.answered(answered, self.detector.decoder, [started - it.arrived for it in live])
        results = iter(answered)
        return [(None, 0) if it.expired else (next(results)[1], images) for it in items]

    async def body(self, request: Request) -> bytes:
        return await read_limited(request.stream(), request.headers.get("content-length"), self.front.max_request_size)

    async def answer(self, parsed) -> tuple[list, int]:
        """The request's results and its batch's image count; ServiceBusy where its batch did not begin within
        max_queue_wait_s. A request whose client leaves before its batch begins is not computed."""
        item = Pending(parsed, time.perf_counter(), tracing.current()[0])
        self.waiting.add(item)
        task = asyncio.ensure_future(self.run_batch(item))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # an expired item's task: nobody awaits it
        wait = self.front.max_queue_wait_s
        try:
            if wait > 0:
                await asyncio.wait({task}, timeout=wait)
                if not task.done() and not item.started:
                    item.expired = True
                    self.waiting.discard(item)
                    raise ServiceBusy(
                        f"waited {wait:g} s for a batch (setting max_queue_wait_s): the service is overloaded; "
                        "retry after the time in Retry-After"
                    )
            return await asyncio.shield(task)
        except asyncio.CancelledError:  # the client went away: not computed unless its batch already began
            if not item.started:
                item.expired = True
                self.waiting.discard(item)
            raise
        except ServiceBusy:
            raise
        except Exception as exc:  # a bug of ours in the batch: every image of the request gets 500
            log.exception("batch failed")
            failed = ProcessingFailed(f"could not process this request ({type(exc).__name__}: {exc})")
            return [failed] * len(parsed.instances), 0

    def busy(self, err: ServiceBusy, oip: bool = False) -> JSONResponse:
        """503 with Retry-After: the seconds the requests waiting now take at the last batch's pace (1..60)."""
        response = error(err, oip)
        batches = len(self.waiting) / max(self.front.max_batch_size, 1)
        response.headers["Retry-After"] = str(min(60, max(1, math.ceil(batches * self.batch_s))))
        return response

    # -- the project's routes (as on TorchServe) ------------------------------------------------------
    @api.get("/ping")
    async def ping(self) -> dict:
        return {"status": "Healthy"}

    @api.api_route("/predictions/{model}", methods=["POST", "PUT"])
    async def predictions(self, model: str, request: Request):
        if model != self.front.name:
            return not_found(model)
        headers = dict(request.headers)
        if headers.get("describe") == "True":
            return json_response(self.detector.describe())
        if headers.get("explain") == "True":
            return error(BadRequest("this model gives no explanations; ask /predictions/all for its detections"))
        try:
            raw = await self.body(request)
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
                row = await form_row(raw, request.headers)
            else:
                row = {"body": torchserve_value(raw, kind)}
        except InputError as err:
            return error(err)
        except Exception as exc:  # an unreadable form: the client's 400
            return error(BadRequest(f"malformed form ({type(exc).__name__}: {str(exc)[:200]})"))
        return await self.respond(row, headers)

    @api.post("/v1/models/{model}:predict")
    async def kserve_v1(self, model: str, request: Request):
        if model != self.front.name:
            return not_found(model)
        try:
            raw = await self.body(request)
        except InputError as err:
            return error(err)
        return await self.respond({"body": torchserve_value(raw, "application/json")}, dict(request.headers))

    async def respond(self, row: dict, headers: dict):
        s = self.detector.settings
        parsed = parse_request(
            row, headers, self.detector.model_names, s.max_instances, s.max_request_pixels, s.decode_limits
        )
        if isinstance(parsed, InputError):
            return error(parsed)
        try:
            results, images = await self.answer(parsed)
        except ServiceBusy as err:
            return self.busy(err)
        status, body = parsed.format(results)
        return json_response(body, status, {"x-batch-images": str(images)})

    # -- the Open Inference Protocol (KServe v2) ------------------------------------------------------
    @api.get("/v2")
    async def v2_server(self) -> dict:
        return server_metadata(__version__)

    @api.get("/v2/health/live")
    async def v2_live(self) -> dict:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def v2_ready(self) -> dict:
        return {"ready": True}

    @api.get("/v2/models/{model}")
    async def v2_metadata(self, model: str):
        if model != self.front.name:
            return not_found(model, oip=True)
        return model_metadata(self.front.name, self.front.version, self.detector.describe()["models"])

    @api.get("/v2/models/{model}/ready")
    async def v2_model_ready(self, model: str):
        if model != self.front.name:
            return not_found(model, oip=True)
        return {"name": model, "ready": True}

    @api.post("/v2/models/{model}/infer")
    async def v2_infer(self, model: str, request: Request):
        if model != self.front.name:
            return not_found(model, oip=True)
        try:
            raw = await self.body(request)
        except InputError as err:
            return error(err, oip=True)
        s = self.detector.settings
        parsed = parse_infer(
            raw,
            request.headers,
            self.front.name,
            self.detector.model_names,
            s.max_instances,
            s.max_request_pixels,
            s.decode_limits,
        )
        if isinstance(parsed, InputError):
            return error(parsed, oip=True)
        try:
            results, images = await self.answer(parsed)
        except ServiceBusy as err:
            return self.busy(err, oip=True)
        status, body, headers = parsed.format(results)
        headers = {**headers, "x-batch-images": str(images)}
        return Response(body, status_code=status, headers=headers, media_type=headers.pop("content-type"))


def build(args: Mapping[str, Any] | None = None) -> serve.Application:
    """Ray Serve's application builder: ``serve run multidet.ray_app:build key=value ...``, a Serve config's
    ``import_path: multidet.ray_app:build`` with ``args:``, or ``serve.run(build({...}))``."""
    front = RayFront.from_mapping(args)
    model_set = Path(front.model_set)
    if not model_set.exists():
        raise ConfigError(f"model set {model_set} not found (on a cluster: a path every node has)")
    config = {**front.to_mapping(), "model_set": str(model_set.resolve())}
    return MultiDet.options(**front.deployment_options()).bind(config)


def ready(url: str, timeout: float = 3) -> bool:
    """The application answers OIP's readiness (a replica is loaded and routed to)."""
    import requests

    try:
        return requests.get(f"{url}/v2/health/ready", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def deploy(
    args: Mapping[str, Any], host: str = "127.0.0.1", port: int = 8000, timeout: float = 600, app_name: str = "multidet"
) -> str:
    """On the Ray cluster this process is connected to (``ray.init``): Serve's HTTP proxy on host:port, the
    application ``build(args)`` deployed (a redeploy when it runs: new replicas first, then the old drained),
    returned once it answers; its URL."""
    import time

    serve.start(http_options={"host": host, "port": port})
    serve.run(build(args), name=app_name, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING" and ready(url):
            return url
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Ray Serve could not deploy {app_name}: {status.message}")
        time.sleep(1)
    raise TimeoutError(
        f"{app_name} not ready at {url} after {timeout:.0f} s (a redeploy on a full cluster waits for CPUs for its new "
        f"replicas beside the old: max_surge_percent=0 replaces them in place instead): {serve.status()}"
    )
