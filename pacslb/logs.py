"""Logging: one line per event, readable by a person (text) or by a machine (JSON), on standard error.

An event is a name plus fields: ``log_event(logger, "conn", service="dicom", client=..., ...)`` prints
``2026-11-27T20:41:49.123Z info  conn service=dicom client=...`` in text and
``{"ts": ..., "level": "info", "event": "conn", "service": "dicom", ...}`` in JSON. Under systemd the
text lines read well in journald (no colour, one line, no embedded newlines except tracebacks).

Values are often chosen by clients (AE titles, HTTP paths, user agents, cookies). Every control
character in a value, a message or a traceback (C0 with NUL, ESC, CR and LF; DEL; C1) is written as
``\\xNN`` in both formats, so that no client can move a terminal's cursor, recolour or rewrite a line
someone reads with ``tail`` or ``less -R``, start a line of its own, or make journald store a line as a
binary blob. Only a traceback keeps its line breaks. A literal backslash is written as it is, so
``\\x1b`` in a value reads "ESC or those four characters".
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: Every control character (C0, DEL, C1) as the four characters of its ``\xNN`` escape.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
#: The same, less the line feed: a traceback keeps its lines.
_CONTROLS_BUT_LF = {code: text for code, text in _CONTROLS.items() if code != 0x0A}

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


def escape(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1) written as ``\\xNN``."""
    # isprintable() is False for every control character (and for a few other characters, which translate
    # leaves alone): the common, clean value costs one scan in C.
    return text if text.isprintable() else text.translate(_CONTROLS)


def _escape_traceback(text: str) -> str:
    return text if text.isprintable() else text.translate(_CONTROLS_BUT_LF)


def _text_value(value: Any) -> str:
    kind = type(value)
    if kind is int:
        return str(value)  # nothing to quote (bool is not int here: it takes the general path)
    if isinstance(value, float):
        return f"{value:.3f}"
    text = escape(value if kind is str else str(value))
    if not text or " " in text or '"' in text or "=" in text:
        return json.dumps(text)
    return text


def _json_value(value: Any) -> Any:
    kind = type(value)
    if kind is str:
        return escape(value)
    if value is None or kind is int or kind is float or kind is bool:
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {escape(str(k)): _json_value(v) for k, v in value.items()}
    return escape(str(value))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, _EVENT, None)
        fields: dict[str, Any] = getattr(record, _FIELDS, {})
        head = f"{_timestamp(record)} {record.levelname.lower():<7}"
        if event is None:
            line = f"{head} {record.name.removeprefix('pacslb.')}: {escape(record.getMessage())}"
        else:
            line = f"{head} {event} " + " ".join([f"{k}={_text_value(v)}" for k, v in fields.items()])
        if record.exc_info:
            line += "\n" + _escape_traceback(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, _EVENT, None)
        out: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower()}
        if event is None:
            out["event"] = "message"
            out["logger"] = record.name
            out["message"] = escape(record.getMessage())
        else:
            out["event"] = event
            for key, value in getattr(record, _FIELDS, {}).items():
                out[key] = _json_value(value)
        if record.exc_info:
            out["traceback"] = _escape_traceback(self.formatException(record.exc_info))
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
