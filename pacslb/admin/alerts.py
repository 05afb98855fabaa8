"""Alerts: tell people when a server changes state or a service is left without a usable server.

What this module owns: turning events (events.py) into messages, by email (SMTP, optionally STARTTLS
and a login, with the standard library's smtplib in a worker thread) and/or as a JSON POST to a webhook
(httpx), batching and rate limiting them. It must never fail the balancer: every failure (DNS, refused,
timeout, rejected login, a 500 from the webhook) is logged as ``alert_failed`` and the next message is
tried as usual. Nothing here blocks the event loop.

Theory of operation. Each channel (email, webhook) has a queue of events and one task. The first event
starts a batch: everything that arrives within ``alerts.batch`` goes out in one message, so a node going
down in four services is one mail. Each channel sends at most ``alerts.max_per_hour`` messages in any
hour (a failed attempt counts too, so a broken mail server is not hammered); past that, events wait and
go out together in the next message allowed, so a flapping node cannot flood a mailbox and no event is
silently lost. At most :data:`MAX_PENDING` events wait; beyond that the oldest are dropped and the next
message says how many.

smtplib and email are imported by the first mail, httpx when a webhook is configured: most balancers
configure no alerts, or one channel, and httpx alone costs megabytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from pacslb import __version__
from pacslb.admin.events import Event, EventLog
from pacslb.config.model import AlertsSpec, EmailSpec, WebhookSpec
from pacslb.logs import log_event
from pacslb.tasks import cancel_and_wait

if TYPE_CHECKING:
    from email.message import EmailMessage

log = logging.getLogger("pacslb.alerts")

#: Events waiting to be sent per channel (while rate limited); beyond it the oldest are dropped.
MAX_PENDING = 1000
#: The rate limit counts messages over this window (``alerts.max_per_hour``).
RATE_WINDOW = 3600.0
#: On shutdown, how long pending alerts may take to go out before pacslb exits anyway.
FLUSH_TIMEOUT = 5.0
#: Events listed one per line in a message; a longer batch lists the first ones and counts the rest.
MAX_LISTED = 100

#: Which event kinds each ``alerts.events`` choice covers.
EVENT_KINDS: dict[str, frozenset[str]] = {
    "health": frozenset({"health", "fate", "clock"}),
    "service": frozenset({"service"}),
    "admin": frozenset({"admin", "halt"}),
    "reload": frozenset({"reload", "lifecycle"}),
}


def _read_secret(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().strip()
    except OSError as exc:
        log_event(log, "alert_config_error", logging.ERROR, file=path, reason=exc.strerror or str(exc))
        return None


def _line(event: Event) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at))
    return f"{when}  {event.level:<7}  {event.message}"


class _Channel:
    """One way of sending (email or webhook), with its own queue, batch timer and rate limit."""

    name = "?"

    def __init__(self, alerter: Alerter) -> None:
        self.alerter = alerter
        self.pending: deque[Event] = deque()
        self.dropped = 0
        self.sent: deque[float] = deque()  # monotonic times of recent attempts, for the rate limit
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def put(self, event: Event) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1
        self.pending.append(event)
        self.wake.set()
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(), name=f"alerts {self.name}")

    def _wait_for_slot(self) -> float:
        """Seconds until the rate limit allows another message (0: now)."""
        now = time.monotonic()
        while self.sent and now - self.sent[0] >= RATE_WINDOW:
            self.sent.popleft()
        if len(self.sent) < self.alerter.spec.max_per_hour:
            return 0.0
        return RATE_WINDOW - (now - self.sent[0])

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            await asyncio.sleep(self.alerter.spec.batch)
            delay = self._wait_for_slot()
            if delay > 0:
                log_event(log, "alert_delayed", logging.WARNING, channel=self.name, waiting=len(self.pending),
                          seconds=delay)  # fmt: skip
                await asyncio.sleep(delay)
                continue
            await self._send_pending()

    async def _send_pending(self) -> None:
        self.wake.clear()
        events, dropped = list(self.pending), self.dropped
        self.pending.clear()
        self.dropped = 0
        if not events:
            return
        self.sent.append(time.monotonic())
        try:
            await self.send(events, dropped)
        except Exception as exc:  # any failure of any kind: logged, never raised
            reason = str(exc) or type(exc).__name__
            log_event(log, "alert_failed", logging.ERROR, channel=self.name, events=len(events), reason=reason)
        else:
            log_event(log, "alert_sent", channel=self.name, events=len(events))

    async def flush(self) -> None:
        """Stop the batch timer and send what is waiting, if the rate limit allows (bounded by the caller)."""
        task, self.task = self.task, None
        if task is not None:
            await cancel_and_wait(task)
        if self.pending and self._wait_for_slot() == 0:
            await self._send_pending()

    async def send(self, events: list[Event], dropped: int) -> None:
        raise NotImplementedError


class _Email(_Channel):
    name = "email"

    async def send(self, events: list[Event], dropped: int) -> None:
        spec = self.alerter.spec.email
        assert spec is not None
        message = self.alerter.compose(events, dropped)
        password = _read_secret(spec.password_file)
        await asyncio.to_thread(_send_mail, spec, password, message)


def _send_mail(spec: EmailSpec, password: str | None, message: EmailMessage) -> None:
    """Deliver one message (blocking: runs in a worker thread). Raises on any failure."""
    import smtplib

    host, port = spec.server
    with smtplib.SMTP(host, port, timeout=spec.timeout) as smtp:
        smtp.ehlo()
        if spec.starttls:
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        if spec.username is not None:
            smtp.login(spec.username, password or "")
        smtp.send_message(message)


class _Webhook(_Channel):
    name = "webhook"

    async def send(self, events: list[Event], dropped: int) -> None:
        import httpx

        spec: WebhookSpec | None = self.alerter.spec.webhook
        assert spec is not None
        payload = self.alerter.payload(events, dropped)
        async with httpx.AsyncClient(timeout=spec.timeout, trust_env=False, follow_redirects=False) as client:
            response = await client.post(spec.url, json=payload, headers={"User-Agent": f"pacslb/{__version__}"})
        if response.status_code >= 300:
            raise RuntimeError(f"{spec.url} answered HTTP {response.status_code}")


class Alerter:
    """Listens to the event log and sends alerts on the configured channels."""

    def __init__(self, spec: AlertsSpec, events: EventLog) -> None:
        self.spec = spec
        self.events = events
        self.hostname = socket.gethostname()
        self.email = _Email(self)
        self.webhook = _Webhook(self)
        self._kinds: frozenset[str] = frozenset()
        self.configure(spec)
        events.subscribers.append(self.on_event)

    def configure(self, spec: AlertsSpec) -> None:
        """Take a new ``alerts:`` section (on reload); what is waiting stays queued."""
        self.spec = spec
        self._kinds = frozenset().union(*(EVENT_KINDS[e] for e in spec.events))
        if spec.webhook is not None:
            # Imported here, at start or reload, not by the first alert: it takes tens of milliseconds of
            # blocking work, which the event loop should not do while something is going wrong.
            import httpx  # noqa: F401

    def on_event(self, event: Event) -> None:
        if event.kind not in self._kinds:
            return
        if self.spec.email is not None:
            self.email.put(event)
        if self.spec.webhook is not None:
            self.webhook.put(event)

    async def close(self) -> None:
        """Send what is waiting (within :data:`FLUSH_TIMEOUT`), then stop listening."""
        with contextlib.suppress(ValueError):
            self.events.subscribers.remove(self.on_event)
        for channel in (self.email, self.webhook):
            try:
                async with asyncio.timeout(FLUSH_TIMEOUT):
                    await channel.flush()
            except TimeoutError:
                log_event(log, "alert_failed", logging.ERROR, channel=channel.name, events=len(channel.pending),
                          reason=f"not sent within {FLUSH_TIMEOUT:g}s of stopping")  # fmt: skip

    # -- what the messages say --------------------------------------------------------------------------

    def subject(self, events: list[Event]) -> str:
        worst = "error" if any(e.level == "error" for e in events) else events[-1].level
        prefix = f"[pacslb {self.hostname}]" + (" PROBLEM" if worst in ("warning", "error") else "")
        if len(events) == 1:
            return f"{prefix} {events[0].message}"
        return f"{prefix} {len(events)} events: {events[-1].message}"

    def compose(self, events: list[Event], dropped: int) -> EmailMessage:
        from email.message import EmailMessage
        from email.utils import formatdate, make_msgid

        spec = self.spec.email
        assert spec is not None
        message = EmailMessage()
        message["From"] = spec.sender
        message["To"] = ", ".join(spec.recipients)
        message["Subject"] = self.subject(events)
        message["Date"] = formatdate(localtime=True)
        message["Message-ID"] = make_msgid("pacslb")
        lines = [f"pacslb on {self.hostname} reports:", ""]
        lines += [_line(e) for e in events[:MAX_LISTED]]
        if len(events) > MAX_LISTED:
            lines.append(f"... and {len(events) - MAX_LISTED} more events (see the log)")
        if dropped:
            lines.append(f"{dropped} earlier events were not kept while alerts were rate limited (see the log)")
        lines += ["", f"At most {self.spec.max_per_hour} messages an hour are sent; more events are grouped."]
        message.set_content("\n".join(lines) + "\n")
        return message

    def payload(self, events: list[Event], dropped: int) -> dict[str, Any]:
        return {
            "source": "pacslb",
            "host": self.hostname,
            "summary": self.subject(events),
            "events": [e.to_json() for e in events[:MAX_LISTED]],
            "not_listed": max(0, len(events) - MAX_LISTED) + dropped,
        }
