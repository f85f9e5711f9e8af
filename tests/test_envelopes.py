"""Request formats (multidet.envelopes): each envelope parses its rows and formats its results."""

from __future__ import annotations

import base64

import pytest

from helpers import NAMES
from multidet.envelopes import (
    KServeV1Envelope,
    MultipartEnvelope,
    ParsedRequest,
    RawEnvelope,
    RequestOptions,
    parse_request,
)
from multidet.errors import BadRequest, InputError, UnsupportedImage

LOADED = NAMES
IMG = b"\xff\xd8\xff\xe0not-really-a-jpeg"


def parse(row, headers=None):
    return parse_request(row, headers or {}, LOADED)


def test_raw_body_with_header_options():
    req = parse({"body": IMG}, {"X-Threshold": "0.25", "X-Models": NAMES[0]})
    assert isinstance(req, ParsedRequest) and isinstance(req.envelope, RawEnvelope)
    assert req.instances == [(IMG, RequestOptions(threshold=0.25, models=(NAMES[0],)))]


def test_multipart_field_options_win_over_headers():
    req = parse({"data": IMG, "threshold": b"0.1"}, {"X-Threshold": "0.9"})
    assert isinstance(req.envelope, MultipartEnvelope)
    assert req.instances == [(IMG, RequestOptions(threshold=0.1))]


def test_kserve_v1_instances_each_with_own_options_and_errors():
    b64 = base64.b64encode(IMG).decode()
    body = {"instances": [{"data": b64}, {"b64": b64, "threshold": 0}, {"data": "not base64 !"}, "x"]}
    req = parse({"body": body}, {"X-Threshold": "0.7"})
    assert isinstance(req.envelope, KServeV1Envelope)
    assert req.instances[0] == (IMG, RequestOptions(threshold=0.7))
    assert req.instances[1] == (IMG, RequestOptions(threshold=0.0))
    assert isinstance(req.instances[2], BadRequest) and "not base64" in req.instances[2].message  # 400, not 415
    assert isinstance(req.instances[3], BadRequest)
    status, out = req.format([{"a": 1}, {"b": 2}, req.instances[2], req.instances[3]])
    assert status == 400 and out["message"].startswith("instance 2:")
    assert req.format([{"a": 1}, {"b": 2}]) == (200, {"predictions": [{"a": 1}, {"b": 2}]})


@pytest.mark.parametrize("instances", [[], "x", None])
def test_kserve_v1_needs_a_non_empty_list(instances):
    err = parse({"body": {"instances": instances}})
    assert isinstance(err, BadRequest) and "instances" in err.message


@pytest.mark.parametrize(
    "row, status, word",
    [
        ({"upload": IMG}, 400, "no image"),
        ({"body": {"image": "x"}}, 415, "JSON"),
        ({"body": "plain text, not base64"}, 415, "text"),
        ({"body": IMG, "threshold": "2"}, 400, "threshold"),
        ({"body": IMG, "colour": "red"}, 400, "unknown parameter"),
    ],
)
def test_bad_requests_are_their_4xx(row, status, word):
    req = parse(row)
    err = req if isinstance(req, InputError) else req.instances[0]
    assert isinstance(err, InputError) and err.status == status and word in err.message


def test_base64_with_line_breaks_is_accepted_as_rfc_2045_allows():
    """What `base64 img.jpg` writes (76-character lines) and KServe accepts: in an instance and as a text body."""
    wrapped = base64.encodebytes(IMG).decode()
    assert "\n" in wrapped
    req = parse({"body": {"instances": [{"data": wrapped}, {"b64": wrapped.replace("\n", "\r\n")}]}})
    assert [body for body, _ in req.instances] == [IMG, IMG]
    assert parse({"body": wrapped}).instances[0][0] == IMG
    assert isinstance(parse({"body": "plain text, not base64"}), UnsupportedImage)  # text is another media type


def test_a_deeply_nested_option_is_a_400_not_an_escaping_error():
    """str() of a 10,000-deep list raises RecursionError: it must come back as that request's (or instance's) 400."""
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    err = parse({"body": IMG, "threshold": deep})
    assert isinstance(err, BadRequest) and "RecursionError" in err.message
    b64 = base64.b64encode(IMG).decode()
    req = parse({"body": {"instances": [{"data": b64}, {"data": b64, "threshold": deep}]}})
    assert req.instances[0] == (IMG, RequestOptions()) and isinstance(req.instances[1], BadRequest)
    assert "instance 1 is malformed" in req.instances[1].message


def test_too_many_instances_is_a_413_naming_the_limit():
    """256 tiny images in 27 KB would be one 256-image tensor batch: refused before any is decoded."""
    from multidet.envelopes import parse_request

    b64 = base64.b64encode(IMG).decode()
    err = parse_request({"body": {"instances": [{"data": b64}] * 17}}, {}, LOADED, max_instances=16)
    assert err.status == 413 and "at most 16" in err.message and "max_instances" in err.message
    assert len(parse_request({"body": {"instances": [{"data": b64}] * 16}}, {}, LOADED, 16).instances) == 16


def test_raw_text_body_that_is_base64_is_the_image():
    req = parse({"body": base64.b64encode(IMG).decode()})
    assert req.instances[0][0] == IMG
    assert RawEnvelope().format([BadRequest("x")]) == (400, {"code": 400, "type": "BadRequest", "message": "x"})


def test_instances_share_one_pixel_budget():
    """Instances that are each within the image limit but together over max_request_pixels: one 413
    before any is decoded; a lone instance is only held to the image limit."""
    from multidet.envelopes import parse_request

    big = base64.b64encode(encode_png(2000, 1000)).decode()  # 2 MP each
    row = {"body": {"instances": [{"data": big}] * 3}}
    err = parse_request(row, {}, LOADED, max_instances=16, max_request_pixels=5_000_000)
    assert err.status == 413 and err.kind == "RequestTooLarge" and "max_request_pixels" in err.message
    assert len(parse_request(row, {}, LOADED, 16, max_request_pixels=6_000_000).instances) == 3
    one = {"body": {"instances": [{"data": big}]}}
    assert len(parse_request(one, {}, LOADED, 16, max_request_pixels=1_000_000).instances) == 1


def encode_png(w: int, h: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (w, h), 7).save(buf, "PNG")
    return buf.getvalue()


def test_json_the_frontend_could_not_parse_is_a_400():
    """TorchServe forwards JSON it cannot parse (malformed, or nested deeper than json.loads allows) as
    bytes: that is a malformed request, not an unsupported image."""
    for body in (b'{"instances": [', '{"instances": ' + '{"x": ' * 5000):
        err = parse({"body": body})
        assert isinstance(err, BadRequest) and err.status == 400 and "JSON" in err.message
