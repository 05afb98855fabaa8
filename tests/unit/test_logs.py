"""Log lines: one per event, key=value text or one JSON object."""

from __future__ import annotations

import json
import logging

import pytest

from pacslb.logs import JsonFormatter, TextFormatter, log_event


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
