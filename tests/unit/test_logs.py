"""Log lines: one per event, key=value text or one JSON object."""

from __future__ import annotations

import json
import logging

import pytest

from pacslb.logs import JsonFormatter, TextFormatter, escape, log_event


def record_of(caplog: pytest.LogCaptureFixture, **fields: object) -> logging.LogRecord:
    logger = logging.getLogger("pacslb.test")
    with caplog.at_level(logging.INFO, logger="pacslb.test"):
        log_event(logger, "conn", logging.INFO, **fields)
    (record,) = caplog.records
    return record


def test_text_line_is_key_value_and_quotes_what_needs_it(caplog: pytest.LogCaptureFixture) -> None:
    record = record_of(caplog, service="dicom", reason='no answer "now"', duration=0.12345, empty="")
    line = TextFormatter().format(record)
    assert "\n" not in line
    head, _, rest = line.partition(" conn ")
    assert head.endswith("Z info   ")
    assert rest == 'service=dicom reason="no answer \\"now\\"" duration=0.123 empty=""'


def test_json_line_is_one_object_with_every_field(caplog: pytest.LogCaptureFixture) -> None:
    record = record_of(caplog, service="dicom", bytes_up=12, end="client_closed")
    out = json.loads(JsonFormatter().format(record))
    assert out["event"] == "conn" and out["level"] == "info"
    assert (out["service"], out["bytes_up"], out["end"]) == ("dicom", 12, "client_closed")
    assert out["ts"].endswith("Z")


def test_disabled_level_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("pacslb.test")
    with caplog.at_level(logging.WARNING, logger="pacslb.test"):
        log_event(logger, "conn", logging.INFO, service="x")
    assert caplog.records == []


#: Every control character: C0 (NUL, ESC, CR, LF among them), DEL and C1.
CONTROLS = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))]
#: What a client could choose: an AE title with a terminal escape, an HTTP path with CR LF and a NUL, a
#: user agent with a C1 CSI (0x9b) and DEL.
HOSTILE = {
    "calling_ae": "\x1b[2J\x1b[31mEVIL",
    "path": "/a\r\nfake line\x00",
    "agent": "ua\x9b31m\x7f",
}


def test_escape_writes_every_control_character_as_hex() -> None:
    for char in CONTROLS:
        assert escape(f"a{char}b") == f"a\\x{ord(char):02x}b"
    assert escape("\x1b") == "\\x1b" and escape("\x00") == "\\x00" and escape("\x85") == "\\x85"
    clean = "AE_TITLE-1 /studies?x=1 é ü 日本 \\"
    assert escape(clean) is clean  # printable text is not copied


def test_text_line_has_no_control_character_whatever_the_values(caplog: pytest.LogCaptureFixture) -> None:
    record = record_of(caplog, **HOSTILE, every="".join(CONTROLS), spaced=" x\x1by ")
    line = TextFormatter().format(record)
    assert not any(char in line for char in CONTROLS), repr(line)
    rest = line.partition(" conn ")[2]
    assert rest.startswith(
        'calling_ae=\\x1b[2J\\x1b[31mEVIL path="/a\\\\x0d\\\\x0afake line\\\\x00" agent=ua\\x9b31m\\x7f '
    )
    # A quoted value is a JSON string whose text holds the escapes.
    spaced = rest.rpartition("spaced=")[2]
    assert json.loads(spaced) == " x\\x1by "


def test_json_line_has_no_control_character_and_holds_the_escapes(caplog: pytest.LogCaptureFixture) -> None:
    record = record_of(caplog, **HOSTILE, every="".join(CONTROLS), listed=["ok", "\x1b"], count=3, on=True)
    line = JsonFormatter().format(record)
    assert not any(char in line for char in CONTROLS), repr(line)
    out = json.loads(line)
    # Decoded, the values hold the escapes as text, not the characters: a log shipper passes on no ESC.
    assert out["calling_ae"] == "\\x1b[2J\\x1b[31mEVIL"
    assert out["path"] == "/a\\x0d\\x0afake line\\x00"
    assert out["agent"] == "ua\\x9b31m\\x7f"
    assert out["every"] == "".join(f"\\x{ord(c):02x}" for c in CONTROLS)
    assert out["listed"] == ["ok", "\\x1b"] and out["count"] == 3 and out["on"] is True


def test_plain_messages_and_tracebacks_are_escaped_too(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("pacslb.test")
    with caplog.at_level(logging.INFO, logger="pacslb.test"):
        try:
            raise ValueError("bad AE \x1b[31mX\r")
        except ValueError:
            logger.exception("failed for %s", "client\x1b]0;title\x07")
    (record,) = caplog.records
    text = TextFormatter().format(record)
    first, *traceback = text.split("\n")
    assert "client\\x1b]0;title\\x07" in first and traceback  # a traceback keeps its lines
    assert not any(char in text for char in CONTROLS if char != "\n"), repr(text)
    assert "bad AE \\x1b[31mX\\x0d" in text
    out = json.loads(JsonFormatter().format(record))
    assert out["message"] == "failed for client\\x1b]0;title\\x07"
    assert "bad AE \\x1b[31mX\\x0d" in out["traceback"] and "\x1b" not in out["traceback"]
