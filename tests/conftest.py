"""Shared fixtures: real photos, the real checkpoints, the core Detector, and a real TorchServe."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

from multidet.compare import compare
from multidet.config import MODEL_NAMES, Settings
from multidet.pipeline import Detector
from multidet.tsconfig import read_properties  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "load_tests" / "images"
CHECKPOINTS = ROOT / "checkpoints"
PHOTOS = sorted(IMAGES.glob("*.jpg"))
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    assert len(PHOTOS) >= 3, f"expected the sample photos in {IMAGES}"
    return {p.stem: p.read_bytes() for p in PHOTOS}


@pytest.fixture(scope="session")
def detector() -> Detector:
    if not (CHECKPOINTS / f"{MODEL_NAMES[0]}.json").exists():
        pytest.fail("checkpoints missing: run `make checkpoints` (make test does it)")
    return Detector.from_checkpoints(CHECKPOINTS, Settings(), torch.device("cpu"))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


SCHEMA_KEYS = {"image", "optimization", "device", "detections", "models", "timing_ms"}


def assert_schema(result: dict, models=MODEL_NAMES) -> None:
    """The response schema of the README, checked field by field."""
    assert set(result) == SCHEMA_KEYS
    w, h = result["image"]["width"], result["image"]["height"]
    assert isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
    assert isinstance(result["optimization"], str) and isinstance(result["device"], str)
    assert [m["name"] for m in result["models"]] == list(models)
    for m in result["models"]:
        assert set(m) == {"name", "num_classes", "count"}
        assert m["count"] == sum(d["model"] == m["name"] for d in result["detections"])
    scores = [d["score"] for d in result["detections"]]
    assert scores == sorted(scores, reverse=True), "detections must be score-descending"
    for d in result["detections"]:
        assert set(d) == {"model", "class_id", "label", "score", "box"}
        assert isinstance(d["class_id"], int) and isinstance(d["label"], str) and 0.0 <= d["score"] <= 1.0
        x1, y1, x2, y2 = d["box"]
        assert all(isinstance(v, float) for v in d["box"])
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, d
    assert set(result["timing_ms"]) == {"decode", "preprocess", "inference", "postprocess", "total"}
    assert all(v >= 0 for v in result["timing_ms"].values())


def assert_equivalent(reference: list[dict], candidate: list[dict]) -> None:
    """Same answer up to float noise (another batch size or process): >= 99 % of the detections
    matched one to one (same model and label), matched boxes within 0.1 px, scores within 1e-4."""
    agreement = compare(reference, candidate)
    assert abs(agreement.reference - agreement.candidate) <= max(1, agreement.reference // 100), agreement
    assert agreement.label_agreement >= 0.99, agreement
    assert agreement.max_box_diff <= 0.1 and agreement.max_score_diff <= 1e-4, agreement


# -- a real TorchServe ---------------------------------------------------------------------------
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

    def logs(self, name: str = "model_log.log", tail: int = 60) -> str:
        path = self.workdir / "logs" / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:]) if path.exists() else ""

    def auth(self, kind: str) -> dict:
        key_file = self.workdir / "key_file.json"
        if not self.token or not key_file.exists():
            return {}
        return {"Authorization": f"Bearer {json.loads(key_file.read_text())[kind]['key']}"}

    def ready_workers(self) -> list[dict]:
        try:
            info = requests.get(f"{self.management}/models/all", headers=self.auth("management"), timeout=3).json()
            return [w for w in info[0]["workers"] if w["status"] == "READY"]
        except (requests.RequestException, ValueError, LookupError):
            return []

    def wait_ready(self, timeout: float = 300) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.proc.returncode}:\n{self.logs('ts_log.log')}")
            try:
                ping = requests.get(f"{self.inference}/ping", headers=self.auth("inference"), timeout=3)
                if ping.status_code == 200 and self.ready_workers():
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"TorchServe not ready after {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        subprocess.run([str(BIN / "torchserve"), "--stop"], env=self.env, cwd=self.workdir,
                       capture_output=True, timeout=60)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def start_torchserve(workdir: Path, mar_args: list[str], extra_properties: dict | None = None,
                     token: bool = False) -> TorchServe:
    """Build a MAR into ``workdir`` and start TorchServe from the repo's config.properties on free ports."""
    store = workdir / "model_store"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "create_mar.py"), "--export-path", str(store),
                    *mar_args], check=True, capture_output=True)
    ports = free_ports(5)
    props = read_properties(ROOT / "config.properties")
    props.update({"inference_address": f"http://127.0.0.1:{ports[0]}",
                  "management_address": f"http://127.0.0.1:{ports[1]}",
                  "metrics_address": f"http://127.0.0.1:{ports[2]}",
                  "grpc_inference_port": str(ports[3]), "grpc_management_port": str(ports[4]),
                  "model_store": str(store)})
    props.update(extra_properties or {})
    config = workdir / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    (workdir / "tmp").mkdir(exist_ok=True)
    # own pid file (TMPDIR) and worker sockets + model extraction (TEMP -> java.io.tmpdir): never
    # collides with a `make serve` server or another test server
    env = dict(os.environ, TMPDIR=str(workdir / "tmp"), TEMP=str(workdir / "tmp"),
               LOG_LOCATION=str(workdir / "logs"), METRICS_LOCATION=str(workdir / "logs"),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    out = open(workdir / "torchserve.out", "wb")
    proc = subprocess.Popen([str(BIN / "torchserve"), "--start", "--foreground", "--ncs",
                             "--ts-config", str(config)], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = TorchServe(props["inference_address"], props["management_address"], props["metrics_address"],
                        workdir, env, proc, token)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The suite's main TorchServe (baseline). batchSize 4: single requests and concurrent batches
    are both exercised by the same server."""
    ts = start_torchserve(tmp_path_factory.mktemp("torchserve"),
                          ["--optimization", "baseline", "--batch-size", "4", "--max-batch-delay", "200"])
    yield ts
    ts.stop()
