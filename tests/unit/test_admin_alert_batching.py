"""Alert batching and rate limiting (pacslb/admin/alerts.py) with a channel that records what it would send."""

from __future__ import annotations

import asyncio
from typing import Any

from pacslb.admin import alerts
from pacslb.admin.events import Event, EventLog
from pacslb.config.model import AlertsSpec


def run_with(spec: dict[str, Any], script: Any) -> list[list[str]]:
    sent: list[list[str]] = []

    async def record(self: Any, events: list[Event], dropped: int) -> None:
        sent.append([e.message for e in events] + ([f"dropped {dropped}"] if dropped else []))

    async def main() -> None:
        log = EventLog()
        alerter = alerts.Alerter(AlertsSpec.model_validate(spec), log)
        alerter.webhook.send = record.__get__(alerter.webhook)  # type: ignore[method-assign]
        await script(log)
        await alerter.close()

    asyncio.run(asyncio.wait_for(main(), 10))
    return sent


def test_events_within_the_batch_time_go_out_in_one_message() -> None:
    async def script(log: EventLog) -> None:
        log.add("health", "warning", "pacs2 is down in dicom")
        log.add("health", "warning", "pacs2 is down in web")
        log.add("admin", "info", "pacs1 set to drain")  # not among the chosen events
        await asyncio.sleep(0.3)

    sent = run_with({"webhook": {"url": "http://127.0.0.1:9/"}, "batch": "100ms"}, script)
    assert sent == [["pacs2 is down in dicom", "pacs2 is down in web"]]


def test_past_the_hourly_limit_events_wait_and_are_not_lost(monkeypatch: Any) -> None:
    monkeypatch.setattr(alerts, "MAX_PENDING", 3)

    async def script(log: EventLog) -> None:
        log.add("health", "warning", "first")
        await asyncio.sleep(0.15)
        for i in range(5):  # the limit is reached: these wait (and only MAX_PENDING of them are kept)
            log.add("health", "warning", f"flap {i}")
        await asyncio.sleep(0.15)

    sent = run_with({"webhook": {"url": "http://127.0.0.1:9/"}, "batch": "50ms", "max_per_hour": 1}, script)
    assert sent == [["first"]]  # on close, the rest stays held back: the limit is a limit


def test_a_failing_channel_is_logged_and_the_next_message_still_goes() -> None:
    calls: list[int] = []

    async def flaky(self: Any, events: list[Event], dropped: int) -> None:
        calls.append(len(events))
        if len(calls) == 1:
            raise OSError("connection refused")

    async def main() -> None:
        log = EventLog()
        alerter = alerts.Alerter(AlertsSpec.model_validate({"webhook": {"url": "http://x/"}, "batch": "0s"}), log)
        alerter.webhook.send = flaky.__get__(alerter.webhook)  # type: ignore[method-assign]
        log.add("service", "error", "service dicom has no usable server")
        await asyncio.sleep(0.1)
        log.add("service", "info", "service dicom is usable again")
        await asyncio.sleep(0.1)
        await alerter.close()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert calls == [1, 1]


def test_the_mail_says_what_happened() -> None:
    log = EventLog()
    spec = AlertsSpec.model_validate(
        {"email": {"server": "mail:25", "sender": "lb@h.example", "recipients": ["a@h.example", "b@h.example"]}}
    )
    alerter = alerts.Alerter(spec, log)
    events = [log.add("health", "warning", "pacs2 is down in dicom"), log.add("service", "error", "service dicom down")]
    mail = alerter.compose(events, dropped=4)
    assert mail["To"] == "a@h.example, b@h.example"
    assert mail["Subject"].endswith("PROBLEM 2 events: service dicom down")
    body = mail.get_content()
    assert "pacs2 is down in dicom" in body and "4 earlier events" in body
