"""Errors a client caused, each with the HTTP status it maps to.

One rule for the whole service:
- 400 Bad Request: the request itself is malformed (empty body, no image part, bad query parameter).
- 413 Payload Too Large: the image declares more pixels than ``max_image_pixels`` (refused from its
  header, before decoding). Bodies over TorchServe's ``max_request_size`` get 413 from the frontend.
- 415 Unsupported Media Type: the bytes are not an image in an accepted format.
- 413 also: a KServe v1 request whose instances together declare more than ``max_request_pixels``.
- 422 Unprocessable Entity: an accepted format whose data is corrupt or truncated, or whose structure
  would cost the decoder more than a limit allows (``ImageTooComplex``: e.g. a JPEG with thousands of
  scans), found before any pixel is decoded; or whose decoding took longer than ``decode_deadline_s``
  (``multidet.isolation.DecodeTimeout``). 413 too when decoding needs more than ``decode_memory_mib``.
- 404 / 405 / 431 on the Ray front as TorchServe answers them: an unknown route (``RouteNotFound``), a method the
  route does not take (``MethodNotAllowed``), request headers over 8 KiB (``HeadersTooLarge``).
- 503 (``ServiceBusy``, the Ray front): a request that waited longer than ``max_queue_wait_s`` for its batch to start,
  answered with ``Retry-After`` and never computed.
- 500 (``ProcessingFailed``): an image we accepted but failed on; a bug of ours, reported for that
  request alone (the others in its batch are served) and logged with its traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """A request the service refuses; ``status`` is the HTTP code, ``message`` one line for the client."""

    status = 400
    kind = "BadRequest"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # always one line

    def to_dict(self) -> dict:
        return {"code": self.status, "type": self.kind, "message": self.message}


class BadRequest(InputError):
    status = 400
    kind = "BadRequest"


class ImageTooLarge(InputError):
    status = 413
    kind = "ImageTooLarge"


class TooManyInstances(InputError):
    status = 413
    kind = "TooManyInstances"


class UnsupportedImage(InputError):
    status = 415
    kind = "UnsupportedMediaType"


class CorruptImage(InputError):
    status = 422
    kind = "CorruptImage"


class RequestTooLarge(InputError):
    status = 413
    kind = "RequestTooLarge"


class ImageTooComplex(InputError):
    status = 422
    kind = "ImageTooComplex"


class ProcessingFailed(InputError):
    status = 500
    kind = "ProcessingFailed"


class NotFound(InputError):
    status = 404
    kind = "ModelNotFoundException"


class RouteNotFound(InputError):
    status = 404
    kind = "ResourceNotFoundException"  # TorchServe's words for a path it does not serve


class MethodNotAllowed(InputError):
    status = 405
    kind = "MethodNotAllowedException"


class HeadersTooLarge(InputError):
    status = 431
    kind = "RequestHeaderFieldsTooLarge"


class ServiceBusy(InputError):
    """Waited longer than the bounded queue wait (the Ray front's max_queue_wait_s) for its batch: 503 + Retry-After."""

    status = 503
    kind = "ServiceUnavailableException"  # TorchServe's words for a full queue
