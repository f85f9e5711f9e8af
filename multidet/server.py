"""A real TorchServe on free loopback ports, for the tests and the benchmark scripts.

``start_torchserve`` builds a MAR (``packaging.build_mar``, in a fresh interpreter) into a work
directory, writes a config derived from the repository's config.properties (``tsconfig.derived``:
own ports, own model store, own pid file and temp dirs, so it never collides with a `make serve`
server or another instance) and waits
until /ping is healthy AND the model has a READY worker (TorchServe's /ping alone turns healthy
while the worker is still loading).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from .packaging import MarOptions, build_mar_isolated
from .tsconfig import PORT_KEYS, derived, read_properties, write_properties

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
    build_s: float = 0.0  # build_mar (incl. a path's build step: ONNX export, AOT compile)
    startup_s: float = 0.0  # torchserve --start until /ping healthy and the worker READY

    def logs(self, name: str = "model_log.log", tail: int = 60) -> str:
        path = self.workdir / "logs" / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:]) if path.exists() else ""

    def auth(self, kind: str) -> dict:
        key_file = self.workdir / "key_file.json"
        if not self.token or not key_file.exists():
            return {}
        return {"Authorization": f"Bearer {json.loads(key_file.read_text())[kind]['key']}"}

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
