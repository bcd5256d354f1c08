"""Log lines as named events: one event name per kind of thing that happened, with its fields.

Both programs log through ``emit``. The text format is logfmt (``event=round_closed round=3
accuracy=0.91``, values with spaces quoted) so ``grep event=`` works; ``--log-format json``
writes one JSON object per line with the same event name and fields, for Loki, Elasticsearch
or ``jq``. Levels mean something: WARNING is for what needs a person's attention, ERROR for what
the program could not do; what the protocol absorbs (a duplicate, a resend) is counted and
logged at DEBUG at most.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

LOG_FORMATS = ("text", "json")


class _Event:
    """The message of an event record, rendered only when a handler formats it."""

    __slots__ = ("name", "fields")

    def __init__(self, name: str, fields: dict[str, Any]) -> None:
        self.name, self.fields = name, fields

    def __str__(self) -> str:
        return " ".join([f"event={self.name}", *(f"{key}={_logfmt_value(value)}" for key, value in self.fields.items())])


def emit(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, _Event(event, fields), extra={"event": event, "fields": fields}, stacklevel=2)


def _logfmt_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple, set, frozenset)):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, event, the event's fields;
    a record from a library that does not use ``emit`` gets event ``log`` and its message."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", "log"),
        }
        fields = getattr(record, "fields", None)
        if fields is None:
            document["message"] = record.getMessage()
        else:
            document.update({key: value for key, value in fields.items() if key not in document})
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
