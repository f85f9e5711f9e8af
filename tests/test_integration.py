"""A real TorchServe (Java frontend + Python worker) serving a MAR built by scripts/create_mar.py."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

import helpers
from helpers import NAMES, assert_same_answer, assert_schema, encode, jpeg_declaring, mar_options, start
from multidet.config import Settings
from multidet.optimizations import OPTIMIZATIONS, list_optimizations
from multidet.quality import agreement

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded():
    """The handler in-process on the trained weights: what the servers here serve."""
    return helpers.embedded()


def url(server, path="/predictions/all"):
    return f"{server.inference}{path}"


def test_ping_and_model_description(server):
    assert requests.get(url(server, "/ping"), timeout=10).json() == {"status": "Healthy"}
    info = requests.get(f"{server.management}/models/all", timeout=10).json()[0]
    assert info["batchSize"] == 4 and info["workers"][0]["status"] == "READY"


def test_raw_put_equals_embedded(server, embedded, photos):
    for name, body in photos.items():
        r = requests.put(url(server), data=body, headers={"X-Threshold": "0"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        result = r.json()
        assert_schema(result)
        assert len(result["models"]) == 3 and result["optimization"] == "baseline" and result["device"] == "cpu"
        want = embedded.predict_one(body, {"threshold": "0"}).body
        assert result["image"] == want["image"]
        assert agreement(want["detections"], result["detections"]).exact(), name


def test_multipart_post_with_form_options(server, embedded, photos):
    r = requests.post(
        url(server),
        files={"data": ("coffee.jpg", photos["coffee"], "image/jpeg")},
        data={"threshold": "0.3", "models": f"{NAMES[0]},{NAMES[2]}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert_schema(r.json(), models=(NAMES[0], NAMES[2]))
    want = embedded.predict_one(photos["coffee"], {"threshold": "0.3", "models": f"{NAMES[0]},{NAMES[2]}"}).body
    assert agreement(want["detections"], r.json()["detections"]).exact()


def test_default_threshold_and_invocations_query(server, photos):
    default = requests.put(url(server), data=photos["coffee"], timeout=60).json()
    assert all(d["score"] >= Settings.threshold for d in default["detections"])
    # TorchServe forwards URL query parameters on /invocations
    r = requests.put(
        url(server, f"/invocations?model_name=all&threshold=0.2&models={NAMES[1]}"),
        data=photos["coffee"],
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert [m["name"] for m in r.json()["models"]] == [NAMES[1]]
    assert all(d["score"] >= 0.2 for d in r.json()["detections"])
    bad = requests.put(url(server, "/invocations?model_name=all&threshold=abc"), data=photos["coffee"], timeout=60)
    assert bad.status_code == 400 and "threshold" in bad.json()["message"]


@pytest.mark.parametrize("case", helpers.BAD_INPUTS)
def test_bad_input_gets_4xx_json(server, photos, case):
    body, headers, status = helpers.bad_input(photos, case)
    r = requests.put(url(server), data=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["code"] == status and err["message"] and "\n" not in err["message"]


def test_upload_over_max_request_size_is_413(server):
    r = requests.put(url(server), data=b"\xff" * (17 * 1024 * 1024), timeout=60)
    assert r.status_code == 413


def test_concurrent_batch_bad_request_fails_alone(server, embedded, labelled):
    """A batch of four with one bad request: it alone fails; the others get their one-by-one answer
    (another batch size: the exact tier's rule, at the serving threshold)."""
    good = labelled[0]
    bodies = [good[0], b"not an image at all", good[1], good[2]]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: requests.put(url(server), data=b, timeout=120), bodies))
    assert [r.status_code for r in responses] == [200, 415, 200, 200]
    for body, r in zip(bodies, responses):
        if r.status_code == 200:
            assert_schema(r.json())
            assert_same_answer(embedded.predict_one(body).body["detections"], r.json()["detections"])
    # TorchServe batched them: the networks ran more than one image in one call (multidet_batch_images)
    sizes = [
        float(m.group(1))
        for m in re.finditer(r"multidet_batch_images\.\w+:([0-9.]+)", server.logs("ts_log.log", tail=100000))
    ]
    assert max(sizes) > 1, sizes


def test_server_healthy_after_bad_inputs_and_metrics(server, photos):
    assert requests.get(url(server, "/ping"), timeout=10).status_code == 200
    assert requests.put(url(server), data=photos["chelsea"], timeout=60).status_code == 200
    metrics = requests.get(f"{server.metrics}/metrics", timeout=10).text
    assert "ts_inference_requests_total" in metrics and 'model_name="all"' in metrics


def unusual_images(photos) -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Valid but unusual images, all made from the real photos: (bytes, displayed size)."""
    import io

    import numpy as np
    from PIL import Image

    coffee = Image.open(io.BytesIO(photos["coffee"])).convert("RGB")  # 600x400
    exif = Image.Exif()
    exif[0x0112] = 6
    rgba = coffee.convert("RGBA")
    rgba.putalpha(128)
    gray16 = Image.fromarray(np.asarray(coffee.convert("L"), np.uint16) * 257)
    return {
        "grayscale": (encode(coffee.convert("L"), "JPEG"), (600, 400)),
        "cmyk": (encode(coffee.convert("CMYK"), "JPEG"), (600, 400)),
        "progressive": (encode(coffee, "JPEG", progressive=True), (600, 400)),
        "exif_rotated": (encode(coffee, "JPEG", exif=exif), (400, 600)),
        "rgba_png": (encode(rgba, "PNG"), (600, 400)),
        "la_png": (encode(coffee.convert("LA"), "PNG"), (600, 400)),
        "palette_png": (encode(coffee.convert("P"), "PNG"), (600, 400)),
        "png16": (encode(gray16, "PNG"), (600, 400)),
        "one_pixel": (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), (1, 1)),
        "extreme_aspect": (encode(Image.new("RGB", (10000, 1), (90, 90, 90)), "PNG"), (10000, 1)),
        "twelve_megapixel": (encode(coffee.resize((4000, 3000)), "JPEG", quality=80), (4000, 3000)),
        "gif": (encode(coffee, "GIF"), (600, 400)),
        "webp": (encode(coffee, "WEBP"), (600, 400)),
        "bmp": (encode(coffee, "BMP"), (600, 400)),
        "tiff": (encode(coffee, "TIFF"), (600, 400)),
    }


def test_unusual_but_valid_images_are_served(server, photos):
    for name, (body, size) in unusual_images(photos).items():
        r = requests.put(url(server), data=body, headers={"X-Threshold": "0"}, timeout=120)
        assert r.status_code == 200, (name, r.text)
        result = r.json()
        assert (result["image"]["width"], result["image"]["height"]) == size, name
        assert_schema(result)  # boxes inside the displayed (rotated) image


def test_bombs_do_not_grow_the_worker(server, photos):
    import psutil

    pid = requests.get(f"{server.management}/models/all", timeout=10).json()[0]["workers"][0]["pid"]
    worker = psutil.Process(pid)
    before = worker.memory_info().rss
    for w, h in ((30000, 30000), (10000, 5000), (60000, 60000)):
        r = requests.put(url(server), data=jpeg_declaring(photos["chelsea"], w, h), timeout=60)
        assert r.status_code == 413, r.text
    grown = (worker.memory_info().rss - before) / 2**20
    assert grown < 50, f"worker RSS grew {grown:.0f} MiB on refused bombs"


def mar_paths():
    """Every servable path but the baseline (the suite's main server), from the registry; an optimization that is
    identical to another on this machine's device is served where it differs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for name in list_optimizations(servable=True):
        cls = OPTIMIZATIONS[name]
        if name == "baseline":
            continue
        if not cls.supports(device):
            why = f"does not run on {device}" + (f": needs {cls.requires}" if cls.requires else ": test_gpu")
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=why)))
        elif device.type in cls.same_as:
            why = f"on {device.type} identical to {cls.same_as[device.type]}"
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=why)))
        else:
            out.append(name)
    return out


# A build of minutes per network (torch.compile, AOTInductor) and auto (it builds, loads and times every candidate
# in the worker) are served for one model of the set: the same build, load and serving code as for three, a
# third of the work (the suite within 30 minutes); the three-model answers of each are test_optimizations'.
ONE_MODEL = NAMES[0]  # the COCO-subset model: the most object kinds, so the most detections to compare


@pytest.mark.parametrize("optimization", mar_paths())
def test_mar_for_each_path_serves_the_baselines_answer(optimization, tmp_path_factory, embedded, labelled):
    """`make mar OPT=X` builds a MAR (trained weights) that TorchServe serves with the baseline's
    answer: exact optimizations its detections at the serving threshold; reduced-precision optimizations are judged by
    mAP (test_paths) and must find the objects here too."""

    cls = OPTIMIZATIONS[optimization]
    if not cls.fast_on("cpu") and not torch.cuda.is_available():
        pytest.skip(f"{optimization} would be emulated on this CPU (seconds a request: Optimization.fast_on)")
    models = (ONE_MODEL,) if cls.build_minutes >= 1 or cls.chooses else NAMES
    ts = start(tmp_path_factory.mktemp(optimization), mar_options(optimization=optimization, models=models))
    try:
        found = 0
        for body in labelled[0][:3]:
            r = requests.put(url(ts), data=body, timeout=120)
            assert r.status_code == 200, r.text
            result = r.json()
            assert_schema(result, models=models)
            assert result["optimization"].split(":")[0] == optimization
            want = embedded.predict_one(body, {"models": ",".join(models)}).body["detections"]
            found += len(want)
            if cls.tier == "exact":
                assert_same_answer(want, result["detections"])
            else:
                assert agreement(want, result["detections"]).matched >= len(want) // 2
        assert found >= 3, found  # the comparison had objects to compare
        if optimization == "aot_inductor":  # compiled at MAR build, only loaded by the worker
            log = ts.logs(tail=400)
            assert f"loaded {len(models)} AOTInductor package" in log and "compiling now" not in log, log[-3000:]
        if optimization.startswith("compile"):  # the Inductor cache packed into the MAR was used
            assert "loaded Inductor cache" in ts.logs(tail=400)
    finally:
        ts.stop()


def test_urllib_form_content_type_is_the_frontends_500_and_octet_stream_works(server, photos):
    """The README's Content-Type note: urllib labels a bare body as a form; TorchServe's frontend then fails
    decoding it (500, bytes echoed) before the worker; the same bytes as application/octet-stream are
    served, so the worker is unharmed."""
    import urllib.error
    import urllib.request

    bare = urllib.request.Request(url(server), data=photos["coffee"], method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bare, timeout=60)
    assert err.value.code == 500 and b"ErrorDataDecoderException" in err.value.read()
    typed = urllib.request.Request(
        url(server), data=photos["coffee"], method="POST", headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(typed, timeout=120) as r:
        assert r.status == 200
        assert_schema(json.loads(r.read()))


def worker_pid(server) -> int:
    return requests.get(f"{server.management}/models/all", timeout=10).json()[0]["workers"][0]["pid"]


def test_hostile_inputs_are_refused_and_the_worker_survives(server):
    """Each file built to stall or bloat the decoder (detlab.hostile) gets its status; the same worker
    (same PID) answers all of them and /ping stays healthy."""
    from detlab import hostile

    pid = worker_pid(server)
    for kind, (make, status) in hostile.KINDS.items():
        r = requests.put(url(server), data=make(), timeout=120)
        assert r.status_code == status, (kind, r.text[:300])
        if status != 200:
            assert r.json()["code"] == status and "\n" not in r.json()["message"], kind
    assert worker_pid(server) == pid
    assert requests.get(url(server, "/ping"), timeout=10).json() == {"status": "Healthy"}


def test_one_batch_mixing_every_kind_of_bad_request(server, embedded, labelled):
    """Good requests sent together with each kind of bad one (a hostile file, a bad option, too many
    instances, JSON nested too deeply, an explanation, a describe header): each gets its own answer,
    the good ones the same detections as one by one (BaseHandler answers the whole batch by the first
    request's describe/explain header)."""
    import base64

    from detlab import hostile

    good = labelled[0]
    b64 = base64.b64encode(good[1]).decode()
    deep = '{"x": ' * 5000 + "1" + "}" * 5000
    nested = f'{{"instances": [{{"data": "{b64}", "threshold": {deep}}}]}}'
    as_json = {"Content-Type": "application/json"}
    cases = [
        ("good", dict(data=good[0]), 200),
        ("hostile", dict(data=hostile.jpeg_many_scans()), 422),
        ("bad_option", dict(data=good[1], headers={"X-Threshold": "abc"}), 400),
        ("good_kserve", dict(json={"instances": [{"data": b64}]}), 200),
        ("too_many", dict(json={"instances": [{"data": b64}] * 17}), 413),
        ("nested", dict(data=nested.encode(), headers=as_json), 400),
        ("explain", dict(data=good[2], path="/explanations/all"), 400),
        ("describe", dict(data=good[2], headers={"describe": "True"}), 200),
        ("good_2", dict(data=good[2]), 200),
    ]

    def send(case):
        name, kw, _ = case
        kw = dict(kw)
        return requests.post(url(server, kw.pop("path", "/predictions/all")), timeout=120, **kw)

    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(send, cases))
    assert [r.status_code for r in responses] == [c[2] for c in cases], [r.text[:200] for r in responses]
    by_name = dict(zip([c[0] for c in cases], responses))
    assert_same_answer(embedded.predict_one(good[0]).body["detections"], by_name["good"].json()["detections"])
    assert_same_answer(embedded.predict_one(good[2]).body["detections"], by_name["good_2"].json()["detections"])
    kserve = by_name["good_kserve"].json()["predictions"][0]
    assert_same_answer(embedded.predict_one(good[1]).body["detections"], kserve["detections"])
    described = by_name["describe"].json()
    assert "detections" not in described and [m["name"] for m in described["models"]] == list(NAMES)
    assert "explanations" in by_name["explain"].json()["message"]


def test_customized_description(server):
    """TorchServe's describe call (management API, customized=true) answers with the model set and what its
    models share (the shipped models differ only in their class layers)."""
    info = requests.get(f"{server.management}/models/all?customized=true", timeout=30).json()[0]
    meta = info["customizedMetadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert [m["name"] for m in meta["models"]] == list(NAMES) and meta["optimization"]
    shared = meta["sharing"]["efficientdet_d0"]
    assert shared["computed"] < shared["without_sharing"] and set(shared["shares"]) <= set(NAMES[1:])
