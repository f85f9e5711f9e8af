"""A short soak (CI's version of `make soak`): mixed good/bad load, no unexpected status, flat memory."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import BIN, IMAGES, ROOT

pytestmark = pytest.mark.integration


def test_short_soak(server, tmp_path):
    from detlab.experiments import soak

    lines = []
    result = soak.run(server.inference, server.management, 30, 2, 10, 10, IMAGES, say=lines.append)
    result.write(tmp_path)
    report = json.loads((tmp_path / "soak_results.json").read_text())
    assert report == json.loads(json.dumps(result.data))
    assert report["unexpected_failures"] == 0, report["unexpected_detail"]
    assert report["worker_restarts"] == 0  # the hostile files of the mixed windows kill nothing
    assert [w["phase"] for w in report["windows"]][:2] == ["clean", "mixed"]
    assert all(w["bad_sent"] == 0 for w in report["windows"] if w["phase"] == "clean")  # clean: photos only
    # what happened, not how much of it in 30 s (a busy machine sends fewer): every request got the
    # status its input expects (unexpected 0, above); each kind of hostile file against a real server
    # is test_integration's
    assert report["requests"] > 0 and sum(report["by_input"].values()) == report["requests"]
    assert report["worker_rss_mib"]["growth_pct"] <= 10 and result.ok()
    assert len(report["windows"]) >= 3 and (tmp_path / "soak.png").stat().st_size > 1000
    assert any("unexpected 0" in x for x in lines)  # progress lines
    assert "unexpected 0" in (tmp_path / "soak_report.txt").read_text()


def test_locust_load_package(server, tmp_path):
    """`locust -f load_tests` as `make load` runs it: real JPEGs, every response checked."""
    import csv

    r = subprocess.run(
        [
            str(BIN / "locust"),
            "-f",
            str(ROOT / "load_tests"),
            "--headless",
            "-u",
            "2",
            "-r",
            "2",
            "-t",
            "15s",
            "--host",
            server.inference,
            "--csv",
            str(tmp_path / "load"),
            "--only-summary",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {row["Name"]: row for row in csv.DictReader(open(tmp_path / "load_stats.csv"))}
    stats = rows["/predictions/all"]
    assert int(stats["Request Count"]) >= 5 and int(stats["Failure Count"]) == 0, stats
    assert float(stats["50%"]) > 0
