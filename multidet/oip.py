"""The Open Inference Protocol (OIP, "KServe v2") for the model set: parse an infer request into the
images and options the data path takes, and format its results as OIP output tensors.

Front-agnostic (bytes and headers in, bytes and headers out): the Ray Serve front uses it
(``multidet.ray_app``); any other server could. What a client sends and gets back:

- input: one ``BYTES`` tensor (any name; ``image`` in the metadata) of shape ``[N]``: N encoded images,
  each in JSON as a base64 string, or raw through the binary-data extension (``Inference-Header-Content-Length``
  and ``parameters.binary_data_size``; what ``tritonclient.http`` sends with ``binary_data=True``).
- options: the request's ``parameters`` ``threshold`` and ``models`` (as on ``/predictions/all``).
- outputs, one row per detection of every image: ``detections`` FP32 ``[M, 6]`` (x1, y1, x2, y2 in image
  pixels, score, class_id), ``image_index`` INT32 ``[M]``, ``model`` and ``label`` BYTES ``[M]``; each in JSON
  or binary as the request asks (``outputs[].parameters.binary_data``, ``parameters.binary_data_output``).
  The response's ``parameters.multidet`` is the project's own JSON: the list of per-image responses.
- errors: the status of the same failure on ``/predictions/all`` (400/413/415/422/500), the body
  ``{"error": message}`` that OIP clients read, plus ``code``/``type``/``message`` as everywhere else.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import DecodeLimits, Settings
from .envelopes import Instance, Result, check_request_pixels, decode_base64, header_options, parse_options
from .errors import BadRequest, InputError, TooManyInstances

HEADER_LENGTH = "inference-header-content-length"  # the binary-data extension's header (lower-case)
INPUT = "image"
# name -> (datatype, shape after the row count)
OUTPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "detections": ("FP32", (6,)),
    "image_index": ("INT32", ()),
    "model": ("BYTES", ()),
    "label": ("BYTES", ()),
}
PROTOCOL_PARAMETERS = ("binary_data_output",)  # request parameters of the protocol itself, not options


def server_metadata(version: str) -> dict:
    return {"name": "multidet", "version": version, "extensions": ["binary_tensor_data"]}


def model_metadata(name: str, version: str, models: Sequence[dict]) -> dict:
    """``GET /v2/models/<name>``: the tensors, plus (beyond the protocol's fields) the model set served
    (``models``: ``Detector.describe()["models"]``)."""
    return {
        "name": name,
        "versions": [version],
        "platform": "pytorch_effdet",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": n, "datatype": d, "shape": [-1, *s]} for n, (d, s) in OUTPUTS.items()],
        "models": list(models),
    }


def error_body(err: InputError, prefix: str = "") -> dict:
    body = err.to_dict()
    body["message"] = prefix + body["message"]
    return {"error": body["message"], **body}


def _lower(headers: Mapping[str, str] | None) -> dict[str, str]:
    return {str(k).lower(): v for k, v in (headers or {}).items()}


def unpack_bytes(data: bytes, count: int) -> list[bytes]:
    """A BYTES tensor in binary form: each element a 4-byte little-endian length, then its bytes."""
    out, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise BadRequest("the BYTES tensor's binary data ends inside an element's length")
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + n > len(data):
            raise BadRequest("the BYTES tensor's binary data is shorter than an element's length says")
        out.append(bytes(data[pos : pos + n]))
        pos += n
    if len(out) != count:
        raise BadRequest(f"the BYTES tensor holds {len(out)} elements; its shape says {count}")
    return out


def pack_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _flatten(data: object) -> list:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


@dataclass
class InferRequest:
    """One OIP infer request: its images (or the InputError each is) and how to answer it."""

    instances: list[Instance | InputError]
    model_name: str
    id: str | None = None
    outputs: tuple[str, ...] = tuple(OUTPUTS)  # requested, in order
    binary: frozenset[str] = frozenset()  # of those, sent as binary data
    parameters: dict = field(default_factory=dict)

    def format(self, results: Sequence[Result]) -> tuple[int, bytes, dict[str, str]]:
        """HTTP status, body and headers: the output tensors, or the first failed image's error (one status
        for the request, as KServe v1 on /predictions/all)."""
        for i, result in enumerate(results):
            if isinstance(result, InputError):
                prefix = f"image {i}: " if len(results) > 1 else ""
                return (
                    result.status,
                    json.dumps(error_body(result, prefix)).encode(),
                    {"content-type": "application/json"},
                )
        rows = [(i, d) for i, r in enumerate(results) for d in r["detections"]]  # type: ignore[index]
        values = {
            "detections": np.array([[*d["box"], d["score"], d["class_id"]] for _, d in rows], np.float32).reshape(
                -1, 6
            ),
            "image_index": np.array([i for i, _ in rows], np.int32),
            "model": [d["model"].encode() for _, d in rows],
            "label": [d["label"].encode() for _, d in rows],
        }
        header: dict = {
            "model_name": self.model_name,
            "outputs": [],
            "parameters": {"multidet": json.dumps(list(results), separators=(",", ":"))},
        }
        if self.id is not None:
            header["id"] = self.id
        blobs = []
        for name in self.outputs:
            datatype, tail = OUTPUTS[name]
            value = values[name]
            out = {"name": name, "datatype": datatype, "shape": [len(rows), *tail]}
            if name in self.binary:
                blob = pack_bytes(value) if datatype == "BYTES" else value.tobytes()
                out["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                out["data"] = [v.decode() for v in value] if datatype == "BYTES" else value.reshape(-1).tolist()
            header["outputs"].append(out)
        text = json.dumps(header, separators=(",", ":")).encode()
        if not blobs:
            return 200, text, {"content-type": "application/json"}
        return (
            200,
            text + b"".join(blobs),
            {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(text))},
        )


def parse_infer(
    body: bytes,
    headers: Mapping[str, str] | None,
    model_name: str,
    loaded: Sequence[str],
    max_instances: int = Settings.max_instances,
    max_request_pixels: int = Settings.max_request_pixels,
    limits: DecodeLimits | None = None,
) -> InferRequest | InputError:
    """An infer request's body and headers -> InferRequest, or the InputError the whole request is."""
    try:
        return _parse(body, _lower(headers), model_name, loaded, max_instances, max_request_pixels, limits)
    except InputError as err:
        return err
    except Exception as exc:  # a malformed request is the client's 400, never our 500
        return BadRequest(f"malformed infer request ({type(exc).__name__}: {str(exc)[:200]})")


def _parse(body, headers, model_name, loaded, max_instances, max_request_pixels, limits) -> InferRequest:
    raw_length = headers.get(HEADER_LENGTH)
    if raw_length is not None:
        try:
            length = int(raw_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {raw_length!r}") from None
        if not 0 < length <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {length}; the body has {len(body)} bytes")
        text, binary = body[:length], body[length:]
    else:
        text, binary = body, b""
    if not text.strip():
        raise BadRequest('empty infer request: send {"inputs": [{"name": "image", "datatype": "BYTES", ...}]}')
    try:
        request = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the infer request's JSON could not be read") from None
    if not isinstance(request, dict):
        raise BadRequest("the infer request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f'"inputs" must hold exactly one tensor: the images ({INPUT!r}, BYTES, shape [N])')
    tensor = inputs[0]
    name = tensor.get("name", INPUT)
    if tensor.get("datatype") != "BYTES":
        raise BadRequest(f"input {name!r} must be BYTES (encoded images), got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r} needs a shape of non-negative integers, e.g. [1], got {shape!r}")
    count = math.prod(shape)
    if count == 0:
        raise BadRequest(f"input {name!r} holds no image (shape {shape})")
    if count > max_instances:
        raise TooManyInstances(
            f"{count} images in one request; at most {max_instances} (setting max_instances): send them in several"
        )
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest(f"input {name!r}'s parameters must be an object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size < 0 or size != len(binary):
            raise BadRequest(f"input {name!r}'s binary_data_size is {size!r}; {len(binary)} bytes follow the JSON")
        images: list[bytes | InputError] = list(unpack_bytes(binary, count))
    else:
        if binary:
            raise BadRequest("binary data follows the JSON but no input declares binary_data_size")
        data = tensor.get("data")
        if data is None:
            raise BadRequest(f"input {name!r} has neither data nor binary_data_size")
        items = _flatten(data)
        if len(items) != count:
            raise BadRequest(f"input {name!r} holds {len(items)} elements; its shape {shape} says {count}")
        images = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                images.append(BadRequest(f"image {i} must be a base64 string, got {type(item).__name__}"))
                continue
            try:
                images.append(decode_base64(item))
            except ValueError as exc:
                images.append(BadRequest(f"image {i} is not base64 ({exc}); send it base64-encoded"))
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("the request's parameters must be an object")
    options = parse_options(
        {**header_options(headers), **{k: v for k, v in parameters.items() if k not in PROTOCOL_PARAMETERS}},
        loaded,
    )
    bodies = [b for b in images if isinstance(b, bytes)]
    check_request_pixels(bodies, limits or DecodeLimits(), max_request_pixels)
    outputs, binary_out = _requested(request, bool(parameters.get("binary_data_output", False)))
    rid = request.get("id")
    return InferRequest(
        [img if isinstance(img, InputError) else (img, options) for img in images],
        model_name,
        str(rid) if rid is not None else None,
        outputs,
        binary_out,
        parameters,
    )


def _requested(request: dict, binary_default: bool) -> tuple[tuple[str, ...], frozenset[str]]:
    wanted = request.get("outputs")
    if wanted is None:
        return tuple(OUTPUTS), frozenset(OUTPUTS) if binary_default else frozenset()
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise BadRequest('"outputs" must be a list of {"name": ...}')
    names, binary = [], set()
    for o in wanted:
        name = o.get("name")
        if name not in OUTPUTS:
            raise BadRequest(f"unknown output {name!r}; the outputs are {', '.join(OUTPUTS)}")
        names.append(name)
        p = o.get("parameters") or {}
        if bool(p.get("binary_data", binary_default)) if isinstance(p, dict) else binary_default:
            binary.add(name)
    return tuple(dict.fromkeys(names)), frozenset(binary)
