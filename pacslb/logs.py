"""Logging: one line per event, readable by a person (text) or by a machine (JSON), on standard error.

An event is a name plus fields: ``log_event(logger, "conn", service="dicom", client=..., ...)`` prints
``2026-11-27T20:41:49.123Z info  conn service=dicom client=...`` in text and
``{"ts": ..., "level": "info", "event": "conn", "service": "dicom", ...}`` in JSON. Under systemd the
text lines read well in journald (no colour, one line, no embedded newlines except tracebacks).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "pacslb_fields"
_EVENT = "pacslb_event"


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event with its fields (skipped cheaply when the level is disabled)."""
    if logger.isEnabledFor(level):
        # What Logger.log does, less findCaller: it walks the stack for a file name and line number that
        # no formatter here prints (a third of the cost of a line, and the access log writes one per request).
        extra = {_EVENT: event, _FIELDS: fields}
        logger.handle(logger.makeRecord(logger.name, level, "", 0, event, (), None, None, extra))


#: The last whole second formatted by _timestamp, and its text (strftime is the dearest part of a line).
_second: tuple[int, str] = (-1, "")


def _timestamp(record: logging.LogRecord) -> str:
    global _second
    second = int(record.created)
    if second != _second[0]:
        _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second[1]}.{int(record.msecs):03d}Z"


def _text_value(value: Any) -> str:
    kind = type(value)
    if kind is int:
        return str(value)  # nothing to quote (bool is not int here: it takes the general path)
    if isinstance(value, float):
        return f"{value:.3f}"
    text = value if kind is str else str(value)
    if not text or " " in text or '"' in text or "=" in text or "\n" in text:
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, _EVENT, None)
        fields: dict[str, Any] = getattr(record, _FIELDS, {})
        head = f"{_timestamp(record)} {record.levelname.lower():<7}"
        if event is None:
            line = f"{head} {record.name.removeprefix('pacslb.')}: {record.getMessage()}"
        else:
            line = f"{head} {event} " + " ".join([f"{k}={_text_value(v)}" for k, v in fields.items()])
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, _EVENT, None)
        out: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower()}
        if event is None:
            out["event"] = "message"
            out["logger"] = record.name
            out["message"] = record.getMessage()
        else:
            out["event"] = event
            out.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    """Send pacslb's logs to standard error in the given format (may be called again on reload)."""
    root = logging.getLogger("pacslb")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    # What a LogRecord would otherwise find out on every line and no formatter here prints (the logging
    # HOWTO's "Optimization"): the process id is a system call per line.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # pynetdicom logs every association it makes at INFO; health checks make many.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
