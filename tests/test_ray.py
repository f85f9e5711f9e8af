"""The Ray Serve front (multidet.ray_app) on a simulated two-node Ray cluster, beside a real TorchServe:
the same answers and statuses through the project's route and OIP v2 (tritonclient unchanged), replicas
on both nodes, batches under concurrency, a killed replica replaced, a redeploy under load."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

import helpers
from helpers import NAMES, RANDOM, ROOT, SHIPPED, assert_same_answer, assert_schema, free_ports
from promserver import Prometheus, assert_counted

ray = pytest.importorskip("ray")
tritonclient_http = pytest.importorskip("tritonclient.http")

from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from multidet.ray_app import build, deploy, ready, serving_environment  # noqa: E402

pytestmark = pytest.mark.integration
METRICS_PORTS = free_ports(2)  # the two nodes' metrics agents

APP = {
    "model_set": str(SHIPPED),
    "optimization": "baseline",
    "num_replicas": 2,
    "num_cpus": 1,
    "threads": 1,
    "max_batch_size": 4,
    "batch_wait_s": 0.2,
    "warmup": False,
}
REPLICA_CLASS = "ServeReplica:multidet:multidet"


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine (two logical CPUs each: a redeploy's new replicas fit beside the old)."""
    serving_environment()
    # every node's metrics agent on a port of its own, reporting every second (Ray's default: 10 s)
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "metrics_export_port": METRICS_PORTS[0]})
    c.add_node(num_cpus=2, metrics_export_port=METRICS_PORTS[1])
    ray.init(address=c.address, logging_level="WARNING")
    c.wait_for_nodes()
    yield c
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def ray_url(cluster):
    return deploy(APP, port=free_ports(1)[0], timeout=600)


def replicas() -> list:
    return list_actors(filters=[("class_name", "=", REPLICA_CLASS), ("state", "=", "ALIVE")])


def example_images(labelled) -> dict[str, bytes]:
    """Images the trained models find things in: the README's example and labelled synthetic ones."""
    return {"example": (ROOT / "docs" / "example.jpg").read_bytes(), **{f"labelled{i}": labelled[0][i] for i in (0, 1)}}


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # binary BYTES: bytes; JSON: str


def oip_detections(result) -> list[dict]:
    """OIP output tensors (a tritonclient InferResult) -> the project's detections of image 0."""
    boxes, models, labels = result.as_numpy("detections"), result.as_numpy("model"), result.as_numpy("label")
    return [
        {
            "model": text(m),
            "class_id": int(row[5]),
            "label": text(lb),
            "score": float(row[4]),
            "box": [float(v) for v in row[:4]],
        }
        for row, m, lb in zip(boxes.reshape(-1, 6), models, labels)
    ]


def test_same_detections_as_torchserve_through_both_routes(server, ray_url, labelled):
    client = tritonclient_http.InferenceServerClient(ray_url.removeprefix("http://"))
    for name, body in example_images(labelled).items():
        ts = requests.put(f"{server.inference}/predictions/all", data=body, timeout=120)
        assert ts.status_code == 200, ts.text
        want = ts.json()["detections"]
        assert want, f"{name}: the trained models find nothing (a weak comparison)"
        rs = requests.put(f"{ray_url}/predictions/all", data=body, timeout=120)
        assert rs.status_code == 200, rs.text
        assert_schema(rs.json())
        assert_same_answer(want, rs.json()["detections"])
        form = requests.post(f"{ray_url}/predictions/all", files={"data": ("x.jpg", body, "image/jpeg")}, timeout=120)
        assert form.status_code == 200, form.text
        assert_same_answer(want, form.json()["detections"])
        # OIP v2: binary-data extension and base64 in JSON, through tritonclient as it is
        for binary in (True, False):
            tensor = tritonclient_http.InferInput("image", [1], "BYTES")
            value = body if binary else base64.b64encode(body).decode()
            tensor.set_data_from_numpy(np.array([value], dtype=object), binary_data=binary)
            outputs = [
                tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in ("detections", "model", "label")
            ]
            result = client.infer("all", [tensor], outputs=outputs)
            assert_same_answer(want, oip_detections(result))
            own = result.get_response()["parameters"]["multidet"]
            assert_same_answer(want, json.loads(own)[0]["detections"])


def test_oip_metadata_health_and_errors(ray_url, photos):
    client = tritonclient_http.InferenceServerClient(ray_url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("all")
    meta = client.get_model_metadata("all")
    assert meta["inputs"][0]["datatype"] == "BYTES" and [m["name"] for m in meta["models"]] == list(helpers.NAMES)
    tensor = tritonclient_http.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"just some text"], dtype=object), binary_data=True)
    with pytest.raises(tritonclient_http.InferenceServerException) as err:
        client.infer("all", [tensor])
    assert err.value.status() == "415"
    r = requests.post(f"{ray_url}/v2/models/all/infer", data=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]
    r = requests.post(f"{ray_url}/v2/models/nope/infer", json={}, timeout=30)
    assert r.status_code == 404
    # a request-level option that is wrong: the 400 of /predictions/all
    body = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(photos["coffee"]).decode()]}
        ],
        "parameters": {"threshold": 2},
    }
    r = requests.post(f"{ray_url}/v2/models/all/infer", json=body, timeout=30)
    assert r.status_code == 400 and "threshold" in r.json()["error"]


@pytest.mark.parametrize("case", helpers.BAD_INPUTS)
def test_bad_input_gets_the_same_status_as_on_torchserve(server, ray_url, photos, case):
    body, headers, status = helpers.bad_input(photos, case)
    ts = requests.put(f"{server.inference}/predictions/all", data=body, headers=headers, timeout=60)
    rs = requests.put(f"{ray_url}/predictions/all", data=body, headers=headers, timeout=60)
    assert ts.status_code == rs.status_code == status, (ts.text, rs.text)
    assert rs.json()["type"] == ts.json()["type"] and "\n" not in rs.json()["message"]


def test_unknown_routes_methods_and_oversized_headers_answer_in_the_projects_words(server, ray_url):
    """Not FastAPI's {"detail": ...}: the project's {code, type, message} (OIP routes: with "error"), as TorchServe
    words an unknown route; headers over 8 KiB are 431 (TorchServe bounds them too); the replica serves on."""
    ts = requests.get(f"{server.inference}/no/such/route", timeout=30)
    rs = requests.get(f"{ray_url}/no/such/route", timeout=30)
    assert ts.status_code == rs.status_code == 404 and rs.json()["type"] == ts.json()["type"], (ts.text, rs.text)
    assert set(rs.json()) == {"code", "type", "message", "request_id"}
    r = requests.delete(f"{ray_url}/predictions/all", timeout=30)
    assert r.status_code == 405 and r.json()["type"] == "MethodNotAllowedException" and r.json()["code"] == 405
    r = requests.get(f"{ray_url}/v2/models/all/nothing-here", timeout=30)
    assert r.status_code == 404 and r.json()["error"] and r.json()["type"] == "ResourceNotFoundException"
    big = {"X-Filler": "a" * 9000}
    r = requests.put(f"{ray_url}/predictions/all", data=b"x", headers=big, timeout=30)
    assert r.status_code == 431 and r.json()["type"] == "RequestHeaderFieldsTooLarge", r.text
    r = requests.post(f"{ray_url}/v2/models/all/infer", data=b"{}", headers=big, timeout=30)
    assert r.status_code == 431 and r.json()["error"] and r.json()["code"] == 431
    assert requests.get(f"{ray_url}/v2/health/ready", timeout=30).status_code == 200


def test_oversized_body_is_413(ray_url):
    r = requests.put(f"{ray_url}/predictions/all", data=b"\xff" * (17 * 1024 * 1024), timeout=60)
    assert r.status_code == 413 and r.json()["type"] == "RequestTooLarge"


def test_a_replicas_settings_read_back_the_same_and_its_builds_go_to_the_cache():
    """What deploy() hands each replica (RayFront.to_mapping) reads back to the same front; the artifact folder
    stays None (the cache, ``artifacts.default_dir``) unless given, never the archives' relative 'artifacts'."""
    from multidet.ray_app import RayFront

    for args in ({"optimization": "onnxruntime"}, {"artifact_dir": "/srv/builds", "num_replicas": 2}):
        front = RayFront.from_mapping(args)
        assert RayFront.from_mapping(front.to_mapping()) == front
    assert RayFront.from_mapping(RayFront.from_mapping({}).to_mapping()).artifact_dir is None


def test_replicas_on_both_nodes_and_batches_under_concurrency(cluster, ray_url, labelled):
    import psutil

    nodes = {a.node_id for a in replicas()}
    assert len(replicas()) == 2 and len(nodes) == 2, replicas()
    assert all(psutil.Process(a.pid).nice() == 0 for a in replicas())  # not Ray's default worker niceness 15
    bodies = list(labelled[0][:8])
    with ThreadPoolExecutor(len(bodies)) as pool:
        sizes = []
        for _ in range(3):  # while one batch runs, the next requests queue and form the next batch
            responses = list(
                pool.map(lambda b: requests.put(f"{ray_url}/predictions/all", data=b, timeout=180), bodies)
            )
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            sizes += [int(r.headers["x-batch-images"]) for r in responses]
    assert max(sizes) > 1, sizes


class SteadyLoad:
    """Clients sending one photo in a loop; every outcome recorded (a status, or the exception: a hang is a
    Timeout after ``timeout`` s)."""

    def __init__(self, url: str, body: bytes, clients: int = 2, timeout: float = 120):
        self.url, self.body, self.timeout = url, body, timeout
        self.outcomes: list[object] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(clients)]

    def loop(self) -> None:
        with requests.Session() as s:
            while not self.stop.is_set():
                try:
                    self.outcomes.append(
                        s.put(f"{self.url}/predictions/all", data=self.body, timeout=self.timeout).status_code
                    )
                except requests.RequestException as exc:
                    self.outcomes.append(exc)

    def __enter__(self) -> SteadyLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout + 10)


def wait_for_replicas(count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app = serve.status().applications["multidet"]
        running = app.deployments["multidet"].replica_states.get("RUNNING", 0)
        if app.status == "RUNNING" and running == count and len(replicas()) == count:
            return
        time.sleep(1)
    raise TimeoutError(f"not {count} running replicas after {timeout} s: {serve.status()}")


def test_killed_replica_is_replaced_and_no_request_hangs(cluster, ray_url, photos):
    victim = replicas()[0]
    with SteadyLoad(ray_url, photos["coffee"]) as load:
        while len(load.outcomes) < 2:
            time.sleep(0.2)
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 60
        while victim.actor_id in {a.actor_id for a in replicas()} and time.monotonic() < deadline:
            time.sleep(0.5)
        wait_for_replicas(2)
        seen = len(load.outcomes)
        while len(load.outcomes) < seen + 2:  # served after the replacement too
            time.sleep(0.2)
    assert victim.actor_id not in {a.actor_id for a in replicas()}
    hung = [o for o in load.outcomes if not isinstance(o, int)]
    assert not hung, hung
    assert all(o == 200 or 500 <= o < 600 for o in load.outcomes), load.outcomes
    assert load.outcomes.count(200) >= 4


def test_redeploy_with_new_weights_under_load_loses_no_request(cluster, ray_url, photos):
    """A new model set (the seeded random checkpoints: other weights) and version, deployed in place while
    clients send: every request 200; afterwards the new version answers."""
    old = {a.actor_id for a in replicas()}
    port = int(ray_url.rsplit(":", 1)[1])
    with SteadyLoad(ray_url, photos["coffee"]) as load:
        while len(load.outcomes) < 2:
            time.sleep(0.2)
        deploy({**APP, "model_set": str(RANDOM), "version": "2"}, port=port, timeout=600)
        wait_for_replicas(2)
        seen = len(load.outcomes)
        while len(load.outcomes) < seen + 2:
            time.sleep(0.2)
    assert not old & {a.actor_id for a in replicas()}, "the old replicas were replaced"
    assert load.outcomes and all(o == 200 for o in load.outcomes), load.outcomes
    assert requests.get(f"{ray_url}/v2/models/all", timeout=30).json()["versions"] == ["2"]


def test_prometheus_counts_ray_per_model_across_both_nodes(cluster, ray_url, tmp_path):
    """A real Prometheus scraping both nodes' metrics agents with the shipped scrape config (which takes Ray's ray_
    prefix off): the same per-model, per-status and per-error counts as on TorchServe (test_metrics), summed over
    the replicas of both nodes; each answer's id in its x-request-id header, its JSON and its replica's log."""
    targets = {"ray": [f"127.0.0.1:{port}" for port in METRICS_PORTS]}
    prom = Prometheus(tmp_path / "prometheus", targets)
    try:
        answers = assert_counted(prom, "ray", ray_url, list(NAMES))
        assert prom.value('count(ray_multidet_model_images_total{job="ray"})') is None  # renamed at scrape
    finally:
        prom.stop()
    logs = "".join(
        p.read_text(errors="replace")
        for p in (Path(cluster.head_node.get_session_dir_path()) / "logs" / "serve").glob("replica_*.log")
    )
    assert answers[1][1]["request_id"] == "prom-test-1"
    for header_id, body in answers:
        assert header_id == body["request_id"] and f"[request_id={header_id}]" in logs


def test_overload_past_the_bounded_wait_is_503_with_retry_after_and_health_is_answered_meanwhile(cluster, ray_url):
    """One replica of one thread, batches of one, max_queue_wait_s 0.5 s, 48 clients at once: a request whose batch
    did not begin within the bound gets 503 ServiceUnavailableException with Retry-After (and is never computed); every
    other is 200 with the unloaded answer; the health route answers while requests are still outstanding (admitted
    into the replica, they wait there, and its event loop is free: inference runs on the replica's own thread)."""
    serve.run(
        build({**APP, "num_replicas": 1, "max_batch_size": 1, "max_queue_wait_s": 0.5}),
        name="busy",
        route_prefix="/busy",
        blocking=False,
    )
    url = f"{ray_url}/busy"
    deadline = time.monotonic() + 300
    while not ready(url):
        assert time.monotonic() < deadline, serve.status()
        time.sleep(1)
    body = (ROOT / "docs" / "example.jpg").read_bytes()
    reference = requests.put(f"{url}/predictions/all", data=body, timeout=120).json()["detections"]
    try:
        with ThreadPoolExecutor(48) as pool:
            sent = [pool.submit(requests.put, f"{url}/predictions/all", data=body, timeout=120) for _ in range(48)]
            time.sleep(0.1)
            live = requests.get(f"{url}/v2/health/live", timeout=30)
            outstanding = sum(not f.done() for f in sent)
            responses = [f.result() for f in sent]
    finally:
        serve.delete("busy")
    assert live.status_code == 200 and outstanding > 0, outstanding
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503} and statuses[200] >= 1 and statuses[503] >= 1, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.json()["type"] == "ServiceUnavailableException" and int(r.headers["Retry-After"]) >= 1
        else:
            assert_same_answer(reference, r.json()["detections"])
