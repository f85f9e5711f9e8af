"""Request ids: a client's ``X-Request-Id`` (bounded, validated) or one the front makes, returned in the response's
header and JSON and written with every log line logged while its request is handled, on both fronts.

``use(ids)`` marks the requests the calling thread works on (a batch: several); ``install()`` makes every log
record carry them (``record.request_id``, and the message prefixed ``[request_id=...]``), whatever logger or
handler writes it: TorchServe's worker and Ray's replica configure their own handlers, so the ids go into the
record itself. ``JsonFormatter`` writes one JSON object a line (the setting ``log_format: json``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence

from .errors import BadRequest

HEADER = "X-Request-Id"
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=/-]{0,127}")

_current: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("multidet_request_ids", default=())


def request_id(headers: Mapping[str, str], made: str | None = None) -> str:
    """The client's X-Request-Id (headers: any case), else ``made`` (a front's own id), else a new uuid4.
    A client's id that is not 1-128 characters of letters, digits and ``._:+=/-`` (first a letter or digit): 400."""
    given = next((v for k, v in headers.items() if k.lower() == HEADER.lower()), None)
    if given is None:
        return made or uuid.uuid4().hex
    if not ID.fullmatch(given):
        raise BadRequest(
            f"header {HEADER} must be 1-128 characters of letters, digits and ._:+=/- starting with a letter or "
            f"digit, got {given[:40]!r}{'...' if len(given) > 40 else ''}"
        )
    return given


@contextlib.contextmanager
def use(ids: Sequence[str]) -> Iterator[None]:
    """Log records made by this thread (or task) meanwhile carry ``ids``."""
    token = _current.set(tuple(ids))
    try:
        yield
    finally:
        _current.reset(token)


def current() -> tuple[str, ...]:
    return _current.get()


_installed = False


def install(json_lines: bool = False) -> None:
    """Every log record made in this process carries the ids of the requests being handled (once per process);
    ``json_lines``: the root logger's handlers write JSON lines (``JsonFormatter``)."""
    global _installed
    if not _installed:
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            ids = _current.get()
            record.request_id = ",".join(ids)
            if ids and not json_lines:
                record.msg = f"[request_id={record.request_id}] {record.msg}"
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
    if json_lines:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id (where a request is handled), exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            out["request_id"] = record.request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)
