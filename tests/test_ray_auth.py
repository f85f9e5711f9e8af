"""Ray closed by default: the local cluster ``make serve-ray`` starts (scripts/serve_ray.py) runs with Ray's token
authentication. A client without the token cannot attach, submit a job or change the
Serve application; the owner (the token Ray keeps in ~/.ray/auth_token, made on first start) can; the serve port
answers everyone; the dashboard listens on loopback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import psutil
import pytest
import requests

from helpers import ROOT, SHIPPED, free_ports

pytest.importorskip("ray")
pytestmark = pytest.mark.integration

SCRIPT = ROOT / "scripts" / "serve_ray.py"

# what a client tries, in a fresh interpreter: attach and run a task, submit a job, read and replace Serve's apps
TRIES = r"""
import json, sys
gcs, dashboard, replace = sys.argv[1], sys.argv[2], sys.argv[3] == "replace"
out = {}
import ray, requests
try:
    ray.init(address=gcs, logging_level="ERROR")
    out["task"] = ray.get(ray.remote(num_cpus=0)(lambda: "ran").remote(), timeout=60)  # the replica holds the CPU
except Exception as exc:
    out["task"] = f"refused: {type(exc).__name__}"
from ray.job_submission import JobSubmissionClient
try:
    out["job"] = "submitted " + JobSubmissionClient(dashboard).submit_job(entrypoint="echo owned")
except Exception as exc:
    out["job"] = f"refused: {type(exc).__name__}"
out["serve_get"] = requests.get(f"{dashboard}/api/serve/applications/", timeout=30).status_code
if replace:
    none = {"applications": []}
    out["serve_put"] = requests.put(f"{dashboard}/api/serve/applications/", json=none, timeout=30).status_code
print("RESULT " + json.dumps(out))
"""


def clean_env(home) -> dict[str, str]:
    """An environment with no Ray token in it (nor any RAY_AUTH_* setting), HOME at ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return {**env, "HOME": str(home)}


def tries(env, gcs: str, dashboard: str, replace: bool) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", TRIES, gcs, dashboard, "replace" if replace else "read"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """``serve_ray.py start`` as ``make serve-ray`` runs it (with the dashboard on, the Jobs API an attacker wants),
    for an owner whose home has no token yet; stopped at the end."""
    owner = tmp_path_factory.mktemp("owner")
    gcs_port, dashboard_port, serve_port = free_ports(3)
    env = clean_env(owner)
    base = [sys.executable, str(SCRIPT)]
    start = [
        *base,
        "start",
        "--model-set",
        str(SHIPPED),
        "--optimization",
        "baseline",
        "--num-cpus",
        "1",
        f"--ray-port={gcs_port}",
        "--dashboard",
        f"--dashboard-port={dashboard_port}",
        f"--port={serve_port}",
        "--set",
        "warmup=false",
        "--set",
        "threads=1",
    ]
    r = subprocess.run(start, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    try:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        yield {
            "owner": env,
            "home": owner,
            "gcs": f"127.0.0.1:{gcs_port}",
            "gcs_port": gcs_port,
            "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "dashboard_port": dashboard_port,
            "serve": f"http://127.0.0.1:{serve_port}",
        }
    finally:
        subprocess.run([*base, "stop"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_client_without_the_token_cannot_attach_submit_a_job_or_change_serve(local_cluster, tmp_path):
    c = local_cluster
    stranger = tries(clean_env(tmp_path), c["gcs"], c["dashboard"], replace=True)
    assert stranger["task"].startswith("refused"), stranger
    assert stranger["job"].startswith("refused"), stranger
    assert stranger["serve_get"] == 401 and stranger["serve_put"] == 401, stranger
    # the application is still there and still answers everyone on the serve port
    assert requests.get(f"{c['serve']}/v2/health/ready", timeout=30).status_code == 200
    body = (ROOT / "docs" / "example.jpg").read_bytes()
    r = requests.put(f"{c['serve']}/predictions/all", data=body, timeout=120)
    assert r.status_code == 200 and r.json()["detections"], r.text


def test_the_owner_has_a_private_token_and_gets_in(local_cluster):
    c = local_cluster
    token = c["home"] / ".ray" / "auth_token"
    assert token.exists() and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text().strip()) == 64
    # a Ray client of 2.60 reads the token file once token mode is on in its environment (Ray's own rule)
    owner = tries({**c["owner"], "RAY_AUTH_MODE": "token"}, c["gcs"], c["dashboard"], replace=False)
    assert owner["task"] == "ran" and owner["job"].startswith("submitted"), owner
    assert owner["serve_get"] == 401  # the REST API takes the token as a header, not from a file: still refused
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"}
    apps = requests.get(f"{c['dashboard']}/api/serve/applications/", headers=headers, timeout=30)
    assert apps.status_code == 200 and "multidet" in apps.json()["applications"], apps.text[:500]


def test_the_dashboard_listens_on_loopback_only(local_cluster):
    """The dashboard (the Jobs API) binds 127.0.0.1; the GCS binds every interface (Ray resolves a loopback node
    address to the host's own): the token refuses strangers there (above)."""
    c = local_cluster
    listening = {
        conn.laddr.ip
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == c["dashboard_port"]
    }
    assert listening == {"127.0.0.1"}, listening
