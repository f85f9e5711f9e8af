"""Overload, worker crash and token authorisation, each against a real TorchServe."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers import assert_schema, embedded, mar_options, start
from multidet.quality import agreement

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    ts = start(tmp_path_factory.mktemp("overload"), mar_options(response_timeout=60), {"job_queue_size": "3"})
    yield ts
    ts.stop()


def timed_put(url, body, timeout=120):
    t0 = time.monotonic()
    r = requests.put(url, data=body, timeout=timeout)
    return r, time.monotonic() - t0


def test_overload_gets_prompt_503_and_recovers(small_queue_server, photos):
    url = f"{small_queue_server.inference}/predictions/all"
    before = sorted(timed_put(url, photos["coffee"])[1] for _ in range(3))[1]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda _: timed_put(url, photos["coffee"]), range(24)))
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) > 0, codes
    rejected = [dt for r, dt in results if r.status_code == 503]
    served = [dt for r, dt in results if r.status_code == 200]
    assert max(rejected) < max(served), "a full queue must be answered at once, not after waiting"
    for r, _ in results:
        if r.status_code == 503:
            assert r.json()["message"]  # TorchServe: "Model all has no worker to serve inference request..."
    # back to normal once the flood is over (a loose sanity bound, not a benchmark)
    after = sorted(timed_put(url, photos["coffee"])[1] for _ in range(3))[1]
    assert after < 5 * before + 1.0, (before, after)


def test_worker_crash_is_recovered(small_queue_server, photos):
    ts = small_queue_server
    url = f"{ts.inference}/predictions/all"
    pid = requests.get(f"{ts.management}/models/all", timeout=10).json()[0]["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    statuses, t0 = [], time.monotonic()
    while time.monotonic() - t0 < 180:
        r = requests.put(url, data=photos["rocket"], headers={"X-Threshold": "0"}, timeout=120)  # never hangs
        statuses.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code >= 500 and r.json()["message"], r.text
        time.sleep(0.5)
    assert statuses[-1] == 200, statuses
    ts.wait_ready()
    new_pid = requests.get(f"{ts.management}/models/all", timeout=10).json()[0]["workers"][0]["pid"]
    assert new_pid != pid
    assert requests.get(f"{ts.inference}/ping", timeout=10).json() == {"status": "Healthy"}
    result = requests.put(url, data=photos["rocket"], headers={"X-Threshold": "0"}, timeout=60).json()
    assert_schema(result)
    want = embedded().predict_one(photos["rocket"], {"threshold": "0"}).body
    assert agreement(want["detections"], result["detections"]).exact()


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    ts = start(tmp_path_factory.mktemp("secure"), None, {"disable_token_authorization": "false"}, token=True)
    yield ts
    ts.stop()


def test_token_authorisation(secure_server, photos):
    ts = secure_server
    keys = json.loads((ts.workdir / "key_file.json").read_text())
    url = f"{ts.inference}/predictions/all"
    denied = requests.put(url, data=photos["coffee"], timeout=60)
    assert denied.status_code in (400, 401) and "Token" in denied.json()["message"]
    wrong = requests.put(url, data=photos["coffee"], headers={"Authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code in (400, 401)
    ok = requests.put(
        url, data=photos["coffee"], headers={"Authorization": f"Bearer {keys['inference']['key']}"}, timeout=60
    )
    assert ok.status_code == 200 and ok.json()["models"]


def test_model_registration_api_is_disabled(secure_server):
    ts = secure_server
    keys = json.loads((ts.workdir / "key_file.json").read_text())
    r = requests.post(
        f"{ts.management}/models?url=https://example.invalid/evil.mar",
        headers={"Authorization": f"Bearer {keys['management']['key']}"},
        timeout=30,
    )
    assert r.status_code == 405, r.text  # enable_model_api=false: registering models is not allowed
    assert (
        requests.get(
            f"{ts.management}/models", headers={"Authorization": f"Bearer {keys['management']['key']}"}, timeout=30
        ).json()["models"][0]["modelName"]
        == "all"
    )


def test_probes_work_with_token_authorisation(secure_server, tmp_path):
    """scripts/probe.py (the container's probes) reads the keys: ready with them, not live without."""
    import subprocess
    import sys

    from helpers import ROOT

    ts = secure_server
    probe = [sys.executable, str(ROOT / "scripts" / "probe.py")]
    urls = ["--inference", ts.inference, "--management", ts.management]
    for check in ("live", "ready"):
        run = subprocess.run(
            [*probe, check, *urls, "--key-file", str(ts.workdir / "key_file.json")], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stdout + run.stderr
    no_keys = ["--key-file", str(tmp_path / "none.json")]
    run = subprocess.run([*probe, "live", *urls, *no_keys], capture_output=True, text=True)
    assert run.returncode == 1 and "not live" in run.stdout


@pytest.fixture(scope="module")
def updatable_server(tmp_path_factory):
    """Token authorisation on and the management API's model calls on: what `make update` needs."""
    extra = {"disable_token_authorization": "false", "enable_model_api": "true"}
    ts = start(tmp_path_factory.mktemp("updatable"), None, extra, token=True)
    yield ts
    ts.stop()


def test_update_under_steady_load_loses_no_request(updatable_server, photos):
    """A new model set replaces the running one through TorchServe's versioning (register 2.0 with its
    worker warmed up, make it the default, unregister 1.0) while two clients keep sending: every request
    sent gets a 200, and afterwards only 2.0 is registered."""
    import threading

    from detlab.packaging import build_mar_isolated
    from detlab.server import replace_model

    ts = updatable_server
    url, auth = f"{ts.inference}/predictions/all", ts.auth("inference")
    stop, outcomes = threading.Event(), []

    def client() -> None:
        s = requests.Session()
        while not stop.is_set():
            try:
                outcomes.append(s.put(url, data=photos["coffee"], headers=auth, timeout=300).status_code)
            except requests.RequestException as exc:
                outcomes.append(repr(exc))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    new = mar_options(threshold=0.3, version="2.0", archive_name="all-2.0")  # another set of settings
    build_mar_isolated(new, ts.workdir / "model_store")
    busy = ts.workdir / "tmp" / "multidet-busy"  # the server's TMPDIR: where its handlers mark themselves busy
    removed = replace_model(
        ts.management, "all-2.0.mar", "2.0", headers=ts.auth("management"), log=lambda _: None, busy=busy
    )
    switched = len(outcomes)
    deadline = time.monotonic() + 600
    while len(outcomes) < switched + 4 and time.monotonic() < deadline:  # some requests on 2.0 too
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    assert removed == ["1.0"]
    assert outcomes and all(o == 200 for o in outcomes), [o for o in outcomes if o != 200][:5]
    versions = requests.get(f"{ts.management}/models/all/all", headers=ts.auth("management"), timeout=30).json()
    assert [v["modelVersion"] for v in versions] == ["2.0"]
