"""The Open Inference Protocol codec (multidet.oip) on its own: what tritonclient sends parses, malformed
requests get the 4xx they are, results come back as tensors tritonclient reads."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from multidet.envelopes import RequestOptions
from multidet.errors import BadRequest, InputError, TooManyInstances, UnsupportedImage
from multidet.oip import HEADER_LENGTH, OUTPUTS, pack_bytes, parse_infer, unpack_bytes

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import deserialize_bytes_tensor  # noqa: E402

LOADED = ("m_a", "m_b")
JPEG = b"\xff\xd8\xff\xe0fake-but-opaque"


def tritonclient_body(images: list[bytes], binary: bool, **parameters) -> tuple[bytes, dict]:
    """The body and headers tritonclient.http itself builds for an infer request."""
    tensor = tritonclient_http.InferInput("image", [len(images)], "BYTES")
    values = images if binary else [base64.b64encode(i).decode() for i in images]
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    body, length = tritonclient_http.InferenceServerClient.generate_request_body(
        [tensor], outputs=outputs, request_id="7", parameters=parameters or None
    )
    return body, ({HEADER_LENGTH: str(length)} if length is not None else {})


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_requests_parse(binary):
    body, headers = tritonclient_body([JPEG, JPEG[::-1]], binary, threshold=0.25, models="m_b")
    req = parse_infer(body, headers, "all", LOADED)
    assert not isinstance(req, InputError), req
    assert [b for b, _ in req.instances] == [JPEG, JPEG[::-1]]
    assert req.instances[0][1] == RequestOptions(threshold=0.25, models=("m_b",))
    assert req.id == "7" and req.outputs == tuple(OUTPUTS)
    assert req.binary == (frozenset(OUTPUTS) if binary else frozenset())


def result(*dets) -> dict:
    return {
        "detections": [
            {"model": m, "class_id": c, "label": f"c{c}", "score": s, "box": [1.0, 2.0, 3.0, 4.0]} for m, c, s in dets
        ]
    }


@pytest.mark.parametrize("binary", [True, False])
def test_results_are_tensors_tritonclient_reads(binary):
    body, headers = tritonclient_body([JPEG, JPEG], binary)
    req = parse_infer(body, headers, "all", LOADED)
    status, out, out_headers = req.format([result(("m_a", 3, 0.9)), result(("m_b", 1, 0.8), ("m_a", 2, 0.7))])
    assert status == 200
    parsed = tritonclient_http.InferResult.from_response_body(
        out, False, int(out_headers.get(HEADER_LENGTH, 0)) or None
    )
    dets = parsed.as_numpy("detections")
    assert dets.shape == (3, 6) and dets[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert parsed.as_numpy("image_index").tolist() == [0, 1, 1]
    assert [m if isinstance(m, str) else m.decode() for m in parsed.as_numpy("model")] == ["m_a", "m_b", "m_a"]
    assert json.loads(parsed.get_response()["parameters"]["multidet"])[1]["detections"][0]["model"] == "m_b"


def test_no_detection_is_an_empty_tensor():
    body, headers = tritonclient_body([JPEG], True)
    status, out, h = parse_infer(body, headers, "all", LOADED).format([result()])
    parsed = tritonclient_http.InferResult.from_response_body(out, False, int(h[HEADER_LENGTH]))
    assert status == 200 and parsed.as_numpy("detections").shape == (0, 6)


def test_a_failed_image_fails_the_request_with_its_status():
    body, headers = tritonclient_body([JPEG, JPEG], True)
    status, out, _ = parse_infer(body, headers, "all", LOADED).format([result(), UnsupportedImage("not an image")])
    err = json.loads(out)
    assert status == 415 and err["error"] == "image 1: not an image" and err["code"] == 415


def test_bytes_tensor_packing_round_trips():
    items = [b"", b"abc", bytes(range(256))]
    assert unpack_bytes(pack_bytes(items), 3) == items
    assert deserialize_bytes_tensor(pack_bytes(items)).tolist() == items
    with pytest.raises(BadRequest):
        unpack_bytes(pack_bytes(items)[:-1], 3)
    with pytest.raises(BadRequest):
        unpack_bytes(pack_bytes(items), 2)


def json_request(**tensor) -> bytes:
    base = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(JPEG).decode()]}
    return json.dumps({"inputs": [{**base, **tensor}]}).encode()


@pytest.mark.parametrize(
    "body,headers,kind",
    [
        (b"", {}, BadRequest),
        (b"[1, 2]", {}, BadRequest),
        (b"{not json", {}, BadRequest),
        (b'{"inputs": []}', {}, BadRequest),
        (json_request(datatype="FP32"), {}, BadRequest),
        (json_request(shape=[2]), {}, BadRequest),
        (json_request(shape="one"), {}, BadRequest),
        (json_request(shape=[0]), {}, BadRequest),
        (json_request(shape=[17], data=["x"] * 17), {}, TooManyInstances),
        (json_request(data=None), {}, BadRequest),
        (json_request() + b"tail", {HEADER_LENGTH: "nope"}, BadRequest),
        (json_request(), {HEADER_LENGTH: "999999"}, BadRequest),
        (json_request(parameters={"binary_data_size": 10}), {HEADER_LENGTH: str(len(json_request()) + 20)}, BadRequest),
        (
            json.dumps(
                {
                    "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
                    "parameters": {"bogus": 1},
                }
            ).encode(),
            {},
            BadRequest,
        ),
        (
            json.dumps(
                {
                    "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
                    "outputs": [{"name": "boxes"}],
                }
            ).encode(),
            {},
            BadRequest,
        ),
        (b"[" * 100000, {}, BadRequest),
    ],
)
def test_malformed_requests_are_4xx(body, headers, kind):
    err = parse_infer(body, headers, "all", LOADED)
    assert isinstance(err, kind) and 400 <= err.status < 500 and "\n" not in err.message, err


def test_an_image_that_is_not_base64_fails_alone():
    body = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [2], "data": ["%%%", base64.b64encode(JPEG).decode()]}
            ]
        }
    )
    req = parse_infer(body.encode(), {}, "all", LOADED)
    assert isinstance(req.instances[0], BadRequest) and req.instances[1][0] == JPEG
