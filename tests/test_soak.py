"""A short soak (CI's version of `make soak`): mixed good/bad load, no unexpected status, flat memory."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration


def test_short_soak(server, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--duration", "45", "--window", "15",
                        "--warmup", "5", "--inference", server.inference, "--management", server.management,
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "soak.json").read_text())
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["unexpected_failures"] == 0, report["unexpected_detail"]
    assert report["requests"] > 20 and report["by_status"].get("200", 0) > 10
    assert {"400", "413", "415", "422"} & set(report["by_status"]), report["by_status"]  # bad inputs were sent
    assert report["worker_rss_mib"]["growth_pct"] <= 10
    assert len(report["windows"]) >= 3 and (tmp_path / "soak.png").stat().st_size > 1000
    assert "unexpected 0" in r.stdout  # progress lines were printed
