"""Recent events for the dashboard and the alerts: what changed, when, as one short line each.

What this module owns: a bounded list of recent events (health changes, admin changes, services left
without a usable server, reloads) that the engine reports, the subscribers told of each one (the
alerts), and the last clock skew the http checks reported per node address. It must not log the events
itself (the engine already logs each one, and the log stays the record); it only keeps them for display.

Clock skew comes from the http check's own log lines (``clock_skew`` / ``clock_ok``): a logging handler on
the ``pacslb.health`` logger reads their fields, so the check code does not need to know this module.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Events kept for the dashboard; older ones are in the log. A day of a flapping node is far more, but the
#: dashboard shows what happened lately, and a bounded list cannot grow with a storm.
MAX_EVENTS = 500


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened."""

    id: int  # increasing: a client asks for what came after the last one it has
    at: float  # wall-clock time (seconds since the epoch)
    kind: str  # health | service | admin | reload | fate | halt | lifecycle
    level: str  # info | warning | error
    message: str  # one line for a person: "pacs2 is down in dicom (connection refused)"
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at,
            "kind": self.kind,
            "level": self.level,
            "message": self.message,
            "fields": self.fields,
        }


Subscriber = Callable[[Event], None]


class EventLog:
    """The recent events, and who wants to hear of new ones."""

    def __init__(self, limit: int = MAX_EVENTS) -> None:
        self.events: deque[Event] = deque(maxlen=limit)
        self.subscribers: list[Subscriber] = []
        self.clock_skew: dict[str, float] = {}  # node address -> skew in seconds (absent: within limits)
        self._next_id = 1
        self._skew_handler = _SkewHandler(self)

    def add(self, kind: str, level: str, message: str, **fields: Any) -> Event:
        """Record an event and tell every subscriber (a failing subscriber is logged, never raised)."""
        event = Event(self._next_id, time.time(), kind, level, message, fields)
        self._next_id += 1
        self.events.append(event)
        for subscriber in list(self.subscribers):
            try:
                subscriber(event)
            except Exception:
                logging.getLogger("pacslb.admin").exception("event subscriber failed")
        return event

    def since(self, last_id: int = 0) -> list[Event]:
        """Events after ``last_id``, oldest first."""
        return [e for e in self.events if e.id > last_id]

    def watch_clock_skew(self) -> None:
        """Start reading the http checks' clock lines (the engine calls this once)."""
        logger = logging.getLogger("pacslb.health")
        if self._skew_handler not in logger.handlers:
            logger.addHandler(self._skew_handler)

    def close(self) -> None:
        logging.getLogger("pacslb.health").removeHandler(self._skew_handler)
        self.subscribers.clear()


class _SkewHandler(logging.Handler):
    """Picks the skew out of ``clock_skew`` and ``clock_ok`` records (fields as pacslb.logs passes them)."""

    def __init__(self, log: EventLog) -> None:
        super().__init__(logging.DEBUG)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "pacslb_event", None)
        if event not in ("clock_skew", "clock_ok"):
            return
        fields: dict[str, Any] = getattr(record, "pacslb_fields", {})
        address = str(fields.get("address", ""))
        if event == "clock_ok":
            self.log.clock_skew.pop(address, None)
            return
        skew = float(fields.get("skew", 0.0))
        first = address not in self.log.clock_skew
        self.log.clock_skew[address] = skew
        if first:
            self.log.add("clock", "warning", f"the clock of {address} is {skew:+.1f} s off", address=address, skew=skew)
