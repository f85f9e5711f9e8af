"""A real TorchServe on free loopback ports, for the tests and the benchmark scripts.

``start_torchserve`` builds a MAR (``packaging.build_mar``, in a fresh interpreter) into a work
directory, writes a config derived from the repository's config.properties (``tsconfig.derived``:
own ports, own model store, own pid file and temp dirs, so it never collides with a `make serve`
server or another instance) and waits
until /ping is healthy AND the model has a READY worker (TorchServe's /ping alone turns healthy
while the worker is still loading).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from multidet.tsconfig import PORT_KEYS, bearer, busy_dir, derived, read_properties, write_properties

from .packaging import MarOptions, build_mar_isolated

BIN = Path(sys.executable).parent


def healthy(inference: str, headers: dict | None = None, timeout: float = 3) -> bool:
    """TorchServe's /ping answers 200 (alone, not proof that a model can answer: see ready_workers)."""
    try:
        return requests.get(f"{inference}/ping", headers=headers or {}, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def ready_workers(management: str, model: str = "all", headers: dict | None = None, timeout: float = 3) -> list[dict]:
    """The model's workers in state READY (empty when the server or the model is not there)."""
    try:
        info = requests.get(f"{management}/models/{model}", headers=headers or {}, timeout=timeout).json()
        return [w for w in info[0].get("workers", []) if w.get("status") == "READY"]
    except (requests.RequestException, ValueError, LookupError, AttributeError):
        return []


def in_flight(management: str, model: str, version: str | None, busy: Path, headers: dict | None = None) -> int:
    """Requests TorchServe holds for ``model`` (one version, or all: None): queued in its job queue +
    being handled by a worker (the handlers' busy markers)."""
    path = f"/models/{model}" + (f"/{version}" if version else "/all")
    try:
        info = requests.get(f"{management}{path}", headers=headers or {}, timeout=5).json()
        queued = sum(int(m.get("jobQueueStatus", {}).get("pendingRequests", 0)) for m in info)
    except (requests.RequestException, ValueError, LookupError, TypeError, AttributeError):
        queued = 0  # the management API is gone: nothing more to wait for there
    pattern = f"{model}-{version}-*" if version else f"{model}-*"
    return queued + len(list(Path(busy).glob(pattern)))


def wait_idle(management: str, model: str, version: str | None, busy: Path, headers=None, timeout=300) -> bool:
    """Until nothing is in flight for ``model`` (``version``) on two checks 0.5 s apart; False at timeout."""
    deadline, idle = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        idle = idle + 1 if in_flight(management, model, version, busy, headers) == 0 else 0
        if idle >= 2:
            return True
        time.sleep(0.5)
    return False


def replace_model(
    management: str,
    archive: str,
    version: str,
    model: str = "all",
    headers: dict | None = None,
    workers: int = 1,
    timeout: float = 900,
    log=print,
    busy: Path | None = None,
) -> list[str]:
    """Replace a running model by another version without losing a request, through TorchServe's model
    versioning: register ``archive`` (a .mar in the server's model store, holding ``version``) with its
    workers loaded, make it the default (new requests go to it), then unregister every other version once
    it is idle (its queue empty and no worker of it inside the handler: ``busy``, default ``busy_dir()``):
    TorchServe answers 500 for a job still on a worker it stops. Needs the management API's model calls
    (``enable_model_api=true``; keep token authorisation on then). Returns the versions removed."""
    headers = headers or {}
    busy = busy or busy_dir()

    def call(method: str, path: str, **params) -> requests.Response:
        r = requests.request(method, f"{management}{path}", params=params, headers=headers, timeout=timeout)
        if r.status_code >= 300:
            raise RuntimeError(f"{method} {path} {params}: {r.status_code} {r.text[:300]}")
        return r

    old = [m["modelVersion"] for m in call("GET", f"/models/{model}/all").json()]
    if version in old:
        raise RuntimeError(f"{model} version {version} is already registered ({old}): choose another")
    log(f"registering {archive} ({model} {version}) with {workers} worker(s)...")
    call("POST", "/models", url=archive, initial_workers=workers, synchronous="true")
    call("PUT", f"/models/{model}/{version}/set-default")
    log(f"{model} {version} is the default; unregistering {old}")
    for v in old:
        if not wait_idle(management, model, v, busy, headers, timeout):
            log(f"{model} {v} still busy after {timeout:.0f} s: unregistering it anyway")
        call("DELETE", f"/models/{model}/{v}")
    return old


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class TorchServe:
    inference: str
    management: str
    metrics: str
    workdir: Path
    env: dict
    proc: subprocess.Popen
    token: bool = False
    build_s: float = 0.0  # build_mar (incl. an optimization's build step: ONNX export, AOT compile)
    startup_s: float = 0.0  # torchserve --start until /ping healthy and the worker READY

    def logs(self, name: str = "model_log.log", tail: int = 60) -> str:
        path = self.workdir / "logs" / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:]) if path.exists() else ""

    def auth(self, kind: str) -> dict:
        return bearer(self.workdir / "key_file.json", kind) if self.token else {}

    def ready_workers(self, model: str = "all") -> list[dict]:
        return ready_workers(self.management, model, self.auth("management"))

    def wait_ready(self, timeout: float = 300) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.proc.returncode}:\n{self.logs('ts_log.log')}")
            if healthy(self.inference, self.auth("inference")) and self.ready_workers():
                return
            time.sleep(1)
        raise TimeoutError(f"TorchServe not ready after {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        subprocess.run(
            [str(BIN / "torchserve"), "--stop"], env=self.env, cwd=self.workdir, capture_output=True, timeout=60
        )
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> TorchServe:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class Serving:
    """What serving this project from a checkout takes: the handler file, the model set file,
    TorchServe's config.properties and the INT8 calibration photos (the command line resolves them)."""

    handler: Path
    model_set: Path
    config: Path
    calibration_photos: Path | None = None

    def mar(self, **values) -> MarOptions:
        """MarOptions.of(...) with this checkout's handler, model set and calibration photos filled in."""
        fixed = {"handler": self.handler, "model_set": self.model_set, "calibration_photos": self.calibration_photos}
        return MarOptions.of(**{**fixed, **values})

    def start(self, workdir: Path, timeout: float = 600, **values) -> TorchServe:
        """A TorchServe serving the archive ``mar(**values)`` builds, from this checkout's config."""
        return start_torchserve(workdir, self.mar(**values), self.config, timeout=timeout)


def start_torchserve(
    workdir: Path,
    mar: MarOptions,
    properties: Path,
    extra_properties: dict | None = None,
    token: bool = False,
    timeout: float = 300,
) -> TorchServe:
    """Build a MAR into ``workdir`` and start TorchServe from ``properties`` (a config.properties) on free ports."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "model_store"
    t0 = time.monotonic()
    build_mar_isolated(mar, store)
    build_s = time.monotonic() - t0
    ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
    props = derived(read_properties(properties), ports=ports, model_store=str(store))
    props.update(extra_properties or {})
    config = write_properties(props, workdir / "config.properties")
    (workdir / "tmp").mkdir(exist_ok=True)
    # own pid file (TMPDIR) and worker sockets + model extraction (TEMP -> java.io.tmpdir)
    env = dict(
        os.environ,
        TMPDIR=str(workdir / "tmp"),
        TEMP=str(workdir / "tmp"),
        LOG_LOCATION=str(workdir / "logs"),
        METRICS_LOCATION=str(workdir / "logs"),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    out = open(workdir / "torchserve.out", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(config)],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = TorchServe(
        props["inference_address"],
        props["management_address"],
        props["metrics_address"],
        workdir,
        env,
        proc,
        token,
        build_s=build_s,
    )
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    server.startup_s = time.monotonic() - t0
    return server
