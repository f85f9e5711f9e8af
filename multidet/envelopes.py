"""Request formats: what a client sends <-> the images and options the data path takes, and back.

TorchServe gives the handler one dict per request (a "row"): the raw body under ``body`` (already
``json.loads``-ed for application/json, a ``str`` for text/*), or each multipart field under its
name. One envelope class per format, each with ``parse`` (row + headers -> instances) and
``format`` (results -> HTTP status + body), the pattern of TorchServe's own request envelopes:

- ``RawEnvelope``        curl -T img.jpg .../predictions/all                 one image, one response
- ``MultipartEnvelope``  curl -F data=@img.jpg -F threshold=0 ...            one image, one response
- ``KServeV1Envelope``   POST {"instances": [{"data": "<base64>"}, ...]}     -> {"predictions": [...]}
                         (on /predictions/all or KServe's /v1/models/all:predict)

Options reach a request three ways: multipart form fields, headers (``X-Threshold``, ``X-Models``)
and URL query parameters. TorchServe 0.12's frontend forwards query parameters to the handler only on
``/invocations`` (and the legacy ``/{model}/predict``); on ``/predictions/{model}`` it drops them
before the worker sees the request, so there the headers or form fields are the way. A KServe
instance may carry its own options beside ``data`` (``{"data": ..., "threshold": 0.3}``).
"""

from __future__ import annotations

import base64
import binascii
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .config import DecodeLimits, Settings
from .decode import header_pixels
from .errors import BadRequest, InputError, RequestTooLarge, TooManyInstances, UnsupportedImage

QUERY_PARAMETERS = ("threshold", "models")
FILE_FIELDS = ("data", "file", "image")  # multipart field names that carry the image
ROUTING_KEYS = ("model_name", "model_version")  # /invocations routing parameters, not options
HEADER_OPTIONS = {"x-threshold": "threshold", "x-models": "models"}


@dataclass(frozen=True)
class RequestOptions:
    threshold: float | None = None  # None: the configured default
    models: tuple[str, ...] | None = None  # None: every loaded model


def parse_options(params: Mapping[str, object], loaded: Sequence[str]) -> RequestOptions:
    """Validate request options; anything wrong is a 400 naming the parameter."""
    values = {
        k: v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v) for k, v in params.items()
    }
    unknown = sorted(set(values) - set(QUERY_PARAMETERS))
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(QUERY_PARAMETERS)}")
    threshold = models = None
    if "threshold" in values:
        raw = values["threshold"].strip()
        try:
            threshold = float(raw)
        except ValueError:
            raise BadRequest(f"parameter 'threshold' must be a number in [0, 1], got {raw!r}") from None
        if not 0.0 <= threshold <= 1.0:  # also rejects nan
            raise BadRequest(f"parameter 'threshold' must be in [0, 1], got {raw!r}")
    if "models" in values:
        names = tuple(n.strip() for n in values["models"].split(",") if n.strip())
        bad = [n for n in names if n not in loaded]
        if not names or bad:
            raise BadRequest(
                f"parameter 'models' must be a comma-separated subset of {', '.join(loaded)}; got {values['models']!r}"
            )
        models = tuple(dict.fromkeys(names))
    return RequestOptions(threshold=threshold, models=models)


Instance = tuple[bytes, RequestOptions]
Result = dict | InputError


def header_options(headers: Mapping[str, str] | None) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in (headers or {}).items():
        option = HEADER_OPTIONS.get(str(name).lower())
        if option:
            out[option] = value
    return out


def _options(own: Mapping[str, object], headers: Mapping[str, str] | None, loaded: Sequence[str]) -> RequestOptions:
    """The request's own options (fields, query parameters, instance keys) win over headers."""
    params = {k: v for k, v in own.items() if k not in ROUTING_KEYS}
    return parse_options({**header_options(headers), **params}, loaded)


_WHITESPACE = str.maketrans("", "", " \t\r\n\v\f")


def decode_base64(text: str) -> bytes:
    """Standard base64, leniently as RFC 2045 allows: line breaks and other whitespace (what ``base64 img.jpg``
    writes) are ignored; anything else that is not base64 raises ValueError."""
    try:
        return base64.b64decode(text.translate(_WHITESPACE), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(str(exc)) from None


def _image_bytes(value: Any, where: str, declared_base64: bool = False) -> bytes:
    """The image bytes of a body or field. ``declared_base64``: the field is base64 by its protocol (KServe's
    ``data``/``b64``), so data that is not base64 is a malformed request (400), not another media type."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        # TorchServe hands text/* bodies over as str: base64 that decodes is the image, other text is refused
        try:
            return decode_base64(value)
        except ValueError as exc:
            if declared_base64:
                raise BadRequest(f"{where} is not base64 ({exc}); send the image base64-encoded") from None
            raise UnsupportedImage(f"{where} is text, not an image; send the image bytes (or base64)") from None
    if isinstance(value, (dict, list)):
        raise UnsupportedImage(f"{where} is JSON, not an image; send the image bytes")
    if value is None:
        return b""
    raise UnsupportedImage(f"{where} is not an image ({type(value).__name__})")


def check_request_pixels(bodies: Sequence[bytes], limits: DecodeLimits, max_request_pixels: int) -> None:
    """Several images of one request: the pixels their headers declare together, at most ``max_request_pixels``
    (413 RequestTooLarge before any is decoded)."""
    if len(bodies) > 1:
        total = sum(header_pixels(b, limits) for b in bodies)
        if total > max_request_pixels:
            raise RequestTooLarge(
                f"the images have {total} pixels together; at most {max_request_pixels} in one request "
                "(setting max_request_pixels): send them in several requests"
            )


def torchserve_value(value: bytes, content_type: str | None) -> object:
    """A body or form part as TorchServe's worker hands it to a handler: JSON parsed for application/json (the
    bytes where it does not parse), text decoded for text/*, bytes otherwise. Other fronts (multidet.ray_app)
    build the handler's rows with it, so every request format is parsed by the same envelopes."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            return json.loads(value)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return value
    if kind.startswith("text/"):
        return value.decode("utf-8", "replace")
    return value


class Envelope(ABC):
    """One request format. ``parse`` raises InputError for a request that is wrong as a whole; an
    instance that is wrong on its own comes back as its InputError (the others are still run)."""

    name: ClassVar[str]
    max_instances: int = Settings.max_instances  # images one request may carry (KServe v1); more: 413
    max_request_pixels: int = Settings.max_request_pixels  # their pixels together (headers); more: 413
    limits: DecodeLimits = DecodeLimits()  # what reading their headers may cost

    @classmethod
    @abstractmethod
    def accepts(cls, row: Mapping[str, Any]) -> bool: ...

    @abstractmethod
    def parse(
        self, row: Mapping[str, Any], headers: Mapping[str, str] | None, loaded: Sequence[str]
    ) -> list[Instance | InputError]: ...

    def format(self, results: Sequence[Result]) -> tuple[int, object]:
        """HTTP status and JSON body of the request (one instance: its response or its error)."""
        (result,) = results
        if isinstance(result, InputError):
            return result.status, result.to_dict()
        return 200, result


class KServeV1Envelope(Envelope):
    """KServe's v1 protocol: ``{"instances": [{"data": "<base64>"}, ...]}`` (KServe's binary form
    ``{"b64": ...}`` too) -> ``{"predictions": [<one response per instance>]}``. One HTTP status for the
    request: a bad instance fails it with that instance's 4xx, naming the instance."""

    name = "kserve_v1"

    @classmethod
    def accepts(cls, row):
        return isinstance(row.get("body"), dict) and "instances" in row["body"]

    def parse(self, row, headers, loaded):
        instances = row["body"]["instances"]
        if not isinstance(instances, list) or not instances:
            raise BadRequest('"instances" must be a non-empty list of {"data": "<base64 image>"}')
        if len(instances) > self.max_instances:
            raise TooManyInstances(
                f"{len(instances)} instances in one request; at most {self.max_instances} (setting max_instances): "
                "send them in several requests"
            )
        out: list[Instance | InputError] = []
        for i, item in enumerate(instances):
            try:
                if not isinstance(item, dict) or not ({"data", "b64"} & set(item)):
                    raise BadRequest(f'instance {i} must be an object with "data": "<base64 image>"')
                key = "data" if "data" in item else "b64"
                body = _image_bytes(item[key], f"instance {i}'s {key!r}", declared_base64=True)
                own = {k: v for k, v in item.items() if k not in ("data", "b64")}
                out.append((body, _options(own, headers, loaded)))
            except InputError as err:
                out.append(err)
            except Exception as exc:  # e.g. RecursionError from a deeply nested option
                out.append(BadRequest(f"instance {i} is malformed ({type(exc).__name__}: {str(exc)[:200]})"))
        check_request_pixels(
            [item[0] for item in out if not isinstance(item, InputError)], self.limits, self.max_request_pixels
        )
        return out

    def format(self, results):
        for i, result in enumerate(results):
            if isinstance(result, InputError):
                body = result.to_dict()
                body["message"] = f"instance {i}: {body['message']}"
                return result.status, body
        return 200, {"predictions": list(results)}


class MultipartEnvelope(Envelope):
    """A multipart form: the image in a field named data, file or image; other fields are options."""

    name = "multipart"

    @classmethod
    def accepts(cls, row):
        return "body" not in row and any(k in row for k in FILE_FIELDS)

    def parse(self, row, headers, loaded):
        key = next(k for k in FILE_FIELDS if k in row)
        body = _image_bytes(row[key], f"field {key!r}")
        own = {k: v for k, v in row.items() if k not in FILE_FIELDS}
        return [(body, _options(own, headers, loaded))]


class RawEnvelope(Envelope):
    """The image as the request body (``curl -T img.jpg``, ``--data-binary @img.jpg``)."""

    name = "raw"

    @classmethod
    def accepts(cls, row):
        return "body" in row

    def parse(self, row, headers, loaded):
        raw = row["body"]
        if isinstance(raw, (bytes, bytearray, str)) and raw[:1] in (b"{", b"[", "{", "["):
            # JSON TorchServe could not parse (it forwards the bytes): malformed or nested too deeply
            raise BadRequest("the body is JSON that could not be read (malformed, or nested too deeply)")
        body = _image_bytes(raw, "body")
        own = {k: v for k, v in row.items() if k != "body"}
        return [(body, _options(own, headers, loaded))]


ENVELOPES: tuple[type[Envelope], ...] = (KServeV1Envelope, MultipartEnvelope, RawEnvelope)


@dataclass
class ParsedRequest:
    """One TorchServe request: its format and its instances (an image + options, or the InputError)."""

    envelope: Envelope
    instances: list[Instance | InputError]

    def format(self, results: Sequence[Result]) -> tuple[int, object]:
        return self.envelope.format(results)


def parse_request(
    row: Mapping[str, Any],
    headers: Mapping[str, str] | None,
    loaded: Sequence[str],
    max_instances: int = Settings.max_instances,
    max_request_pixels: int = Settings.max_request_pixels,
    limits: DecodeLimits | None = None,
) -> ParsedRequest | InputError:
    """Recognise the request's format and parse it; a request wrong as a whole is its InputError. Nothing a
    request sends escapes as anything else: an unexpected error while parsing it (a deeply nested option's
    RecursionError, a value of an odd type) is that request's 400."""
    try:
        return _parse_request(row, headers, loaded, max_instances, max_request_pixels, limits or DecodeLimits())
    except InputError as err:
        return err
    except Exception as exc:  # one request's malformed data must not fail its batch
        return BadRequest(f"malformed request ({type(exc).__name__}: {str(exc)[:200]})")


def _parse_request(row, headers, loaded, max_instances, max_request_pixels, limits) -> ParsedRequest | InputError:
    envelope_cls = next((cls for cls in ENVELOPES if cls.accepts(row)), None)
    if envelope_cls is None:
        return BadRequest(
            "no image in the request: send it as the body (curl -T img.jpg URL), as a multipart field "
            f'named one of {", ".join(FILE_FIELDS)}, or as KServe v1 {{"instances": [{{"data": "<base64>"}}]}}'
        )
    envelope = envelope_cls()
    envelope.max_instances = max_instances
    envelope.max_request_pixels = max_request_pixels
    envelope.limits = limits
    try:
        return ParsedRequest(envelope, envelope.parse(row, headers, loaded))
    except InputError as err:
        return err
