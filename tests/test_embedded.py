"""Embedded mode: TorchServe's own Context and handle() path, in-process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from detlab.embedded import EmbeddedRequest
from helpers import NAMES, RANDOM, ROOT, assert_schema, embedded
from multidet.config import Settings
from multidet.pipeline import RequestOptions
from multidet.quality import agreement


@pytest.fixture(scope="module")
def service():
    return embedded(Settings(), RANDOM, batch_size=4)


def without_timing(result: dict) -> dict:
    """The answer without what differs from run to run: times (timing_ms, each model's inference_ms), the request id."""
    out = {k: v for k, v in result.items() if k not in ("timing_ms", "request_id")}
    out["models"] = [{k: v for k, v in m.items() if k != "inference_ms"} for m in result["models"]]
    return out


def test_handler_equals_core_package(service, detector, photos):
    for name, body in photos.items():
        got = service.predict_one(body, {"threshold": "0"})
        assert got.status == 200
        assert_schema(got.body)
        want = detector.predict_one(body, RequestOptions(threshold=0.0))
        assert without_timing(got.body) == without_timing(want), name
        assert agreement(want["detections"], got.body["detections"]).exact()


def test_options_from_headers_and_form_fields(service, photos):
    by_header = service.predict_one(photos["coffee"], headers={"X-Threshold": "0.2", "X-Models": NAMES[0]})
    by_field = service.predict_one(photos["coffee"], {"threshold": "0.2", "models": NAMES[0]})
    assert by_header.status == by_field.status == 200
    assert without_timing(by_header.body) == without_timing(by_field.body)
    assert [m["name"] for m in by_header.body["models"]] == [NAMES[0]]
    assert all(d["score"] >= 0.2 for d in by_header.body["detections"])
    # /invocations' routing parameter is not an option
    assert service.predict_one(photos["coffee"], {"model_name": "all"}).status == 200


@pytest.mark.parametrize(
    "params,headers,word",
    [
        ({"threshold": "abc"}, {}, "threshold"),
        ({"threshold": "2"}, {}, "threshold"),
        ({"threshold": "nan"}, {}, "threshold"),
        ({"models": "unknown"}, {}, "models"),
        ({}, {"X-Threshold": "-1"}, "threshold"),
        ({"colour": "red"}, {}, "colour"),
    ],
)
def test_bad_options_are_400_naming_the_parameter(service, photos, params, headers, word):
    r = service.predict_one(photos["coffee"], params, headers)
    assert r.status == 400 and r.body["code"] == 400 and word in r.body["message"]


def test_batch_with_one_bad_request(service, photos):
    """Four requests in one handle() call: the bad one fails alone, the others succeed."""
    reqs = [
        EmbeddedRequest(photos["coffee"], {"threshold": "0"}),
        EmbeddedRequest(b"this is not an image"),
        EmbeddedRequest(photos["rocket"], {"threshold": "0"}, field_name="data"),
        EmbeddedRequest(photos["chelsea"], {"threshold": "5"}),
    ]
    out = service.predict(reqs)
    assert [r.status for r in out] == [200, 415, 200, 400]
    for i in (0, 2):
        assert_schema(out[i].body)
        single = service.predict_one(reqs[i].body, {"threshold": "0"})
        assert out[i].body["image"] == single.body["image"]
    assert out[1].body["type"] == "UnsupportedMediaType"


def test_a_decode_past_its_deadline_fails_alone_in_its_batch(photos):
    """The handler with a short decode deadline and the run-length limit lifted: the slow image of a
    batch gets 422 while the photos beside it are served, and the next batch is served too."""
    from detlab import hostile

    slow = embedded(Settings(decode_deadline_s=0.2, max_rle_pixels=10**9), RANDOM, batch_size=3)
    out = slow.predict(
        [
            EmbeddedRequest(photos["coffee"]),
            EmbeddedRequest(hostile.bmp_rle(8000, 5000)),
            EmbeddedRequest(photos["rocket"]),
        ]
    )
    assert [r.status for r in out] == [200, 422, 200]
    assert out[1].body["type"] == "ImageTooComplex" and "decode_deadline_s" in out[1].body["message"]
    assert slow.predict_one(photos["chelsea"]).status == 200


def test_missing_image_field(service, photos):
    r = service.predict([EmbeddedRequest(photos["coffee"], field_name="upload")])[0]
    assert r.status == 400 and "no image" in r.body["message"]


def test_predict_script_prints_the_server_json(photos):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "predict.py"),
            str(ROOT / "load_tests/images/coffee.jpg"),
            "--threshold",
            "0.3",
            "--models",
            f"{NAMES[0]},{NAMES[1]}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    result = json.loads(out.stdout)
    assert_schema(result, models=(NAMES[0], NAMES[1]))
    assert all(d["score"] >= 0.3 for d in result["detections"])


def test_handler_profile_turns_on_torchserves_handler_timings(photos):
    """``handler.profile: true`` (accepted by Settings, read by TorchServe's ts.handler_utils.timer) adds
    ts_handler_preprocess/inference/postprocess metrics; without it there are none."""
    names = {}
    for profile in (False, True):
        svc = embedded(Settings(profile=profile, warmup=False), RANDOM)
        assert svc.predict_one(photos["coffee"]).status == 200
        names[profile] = str(svc.context.metrics.cache)
    for step in ("preprocess", "inference", "postprocess"):
        assert f"ts_handler_{step}" in names[True] and f"ts_handler_{step}" not in names[False]
