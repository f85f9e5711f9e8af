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
