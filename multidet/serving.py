"""TorchServe's request format <-> multidet: what the handler needs beyond the data path.

TorchServe gives the handler one dict per request: the raw body under ``body`` (``curl -T``) or
each multipart field under its name (``-F data=@img.jpg``). The image is taken from the first of
IMAGE_KEYS present; every other key is an option. Options reach us three ways:

- multipart form fields:  curl -F data=@img.jpg -F threshold=0 .../predictions/all
- request headers:        curl -T img.jpg -H 'X-Threshold: 0' -H 'X-Models: a,b' .../predictions/all
- URL query parameters:   curl -T img.jpg '.../invocations?model_name=all&threshold=0'

TorchServe 0.12's frontend forwards URL query parameters to the handler only on ``/invocations``
(and the legacy ``/{model}/predict``); on ``/predictions/{model}`` it drops them before the worker
sees the request, so there the headers or form fields are the way.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import BadRequest, UnsupportedImage
from .pipeline import RequestOptions, parse_options

IMAGE_KEYS = ("body", "data", "file", "image")
ROUTING_KEYS = ("model_name", "model_version")  # /invocations routing parameters, not options
HEADER_OPTIONS = {"x-threshold": "threshold", "x-models": "models"}


def split_request(
    row: Mapping[str, Any], loaded_models: Sequence[str], headers: Mapping[str, str] | None = None
) -> tuple[bytes, RequestOptions]:
    """One TorchServe request dict (+ its headers) -> (image bytes, options). Raises InputError (4xx)."""
    key = next((k for k in IMAGE_KEYS if k in row), None)
    if key is None:
        raise BadRequest(
            f"no image in the request: send it as the body (curl -T img.jpg URL) "
            f"or as a multipart field named one of {', '.join(IMAGE_KEYS[1:])}"
        )
    body = row[key]
    if isinstance(body, str):
        # KServe's v1 protocol sends {"instances": [{"data": "<base64>"}]}; TorchServe also hands
        # text/* bodies over as str. Base64 that decodes is the image; any other text is refused.
        try:
            body = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise UnsupportedImage(
                'body is text, not an image; send the image bytes (or base64 in a KServe instance\'s "data")'
            ) from None
    if isinstance(body, (dict, list)):  # ... and application/json bodies to objects
        raise UnsupportedImage("body is JSON, not an image; send the image bytes")
    params = {k: v for k, v in row.items() if k not in IMAGE_KEYS and k not in ROUTING_KEYS}
    for name, value in (headers or {}).items():
        option = HEADER_OPTIONS.get(str(name).lower())
        if option and option not in params:
            params[option] = value
    return bytes(body or b""), parse_options(params, loaded_models)
