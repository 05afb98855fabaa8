"""The demo's layout: every port from one base, the AE titles, the timings, and the DICOM constants the
simulated nodes answer with."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


log = logging.getLogger("pacslb.demo")

DEFAULT_BASE_PORT = 10000
#: Offsets from the base port. The services keep INFINITT's well-known port numbers as offsets so the
#: mapping is obvious (104 -> base+104); the nodes sit above 1100 so they never collide with those.
SERVICE_OFFSETS: dict[str, int] = {"web": 80, "dicom": 104, "query": 105, "mwl": 204}
NODE_DICOM_OFFSET = 1100
NODE_HTTP_OFFSET = 1180
ADMIN_OFFSET = 900
NODE_COUNT = 3
#: The highest base for which every derived port (the last node's HTTP port) is still a valid port.
MAX_BASE_PORT = 65535 - NODE_HTTP_OFFSET - NODE_COUNT
#: Below 1024 needs privileges, which a demo must never ask for.
MIN_BASE_PORT = 1024
HOST = "127.0.0.1"

#: The called AE title printed in the examples. Any title works: the nodes do not check it.
BALANCER_AE = "INFINITT"
#: The calling AE title of the balancer's C-ECHO health checks; the nodes log these at debug level and
#: leave them out of their request counts so the counts show only what a user did.
CHECK_CALLING_AE = "PACSLB"
#: Health checks every 2 s (a node that fails is out within fall x interval = 6 s). Not 1 s: each
#: C-ECHO check is a whole pynetdicom association and each HTTP check a new httpx client, 12 checks per
#: interval in this one process; the idle demo took 35% of a core at 1 s, 17% at 2 s (2-core VM).
CHECK_INTERVAL = "2s"
#: As long as the interval allows. The first round runs all twelve checks at once while the engine
#: starts, GIL-bound on both ends: 0.85 s on an idle 2-core VM, over 2 s with the CPUs oversubscribed,
#: and a failed first check takes a node out at once.
CHECK_TIMEOUT = "2s"
PERSISTENCE_TIMEOUT = "30m"
#: Ctrl-C should end the demo promptly; a browser's idle keep-alive connection would otherwise hold
#: shutdown for the default 30 s.
SHUTDOWN_GRACE = "2s"

#: Enough images to see a multi-instance association, few enough to send in a blink.
DEMO_STUDY_INSTANCES = 4
DEMO_PATIENT_NAME = "DEMO^PACSLB"
DEMO_PATIENT_ID = "PACSLB-DEMO"

#: pynetdicom's default is 10 concurrent associations; health checks take some, and a user trying
#: --no-persistence with a loop of clients should not hit the limit first.
NODE_MAX_ASSOCIATIONS = 64
#: An idle keep-alive HTTP connection is closed after this, so a forgotten browser tab does not hold
#: a handler thread forever.
HTTP_IDLE_TIMEOUT = 30.0

# DIMSE status codes (PS3.4 annex C.4.1.1.4 for C-FIND, PS3.7 annex C for the general ones).
STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900

VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
#: Query/retrieve levels each information model allows (PS3.4 C.6.1 patient root, C.6.2 study root).
LEVELS_BY_MODEL: dict[str, tuple[str, ...]] = {
    PATIENT_ROOT_FIND: ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    STUDY_ROOT_FIND: ("STUDY", "SERIES", "IMAGE"),
}


# -- ports -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoPorts:
    """Every port of the demo, derived from one base."""

    base: int

    def service(self, name: str) -> int:
        return self.base + SERVICE_OFFSETS[name]

    def node_dicom(self, index: int) -> int:
        return self.base + NODE_DICOM_OFFSET + index

    def node_http(self, index: int) -> int:
        return self.base + NODE_HTTP_OFFSET + index

    def admin(self) -> int:
        """The admin API and dashboard."""
        return self.base + ADMIN_OFFSET

    def all(self) -> list[int]:
        """Every port the demo binds (services first, then nodes), e.g. to check they are free."""
        nodes = range(1, NODE_COUNT + 1)
        return [
            *(self.service(n) for n in SERVICE_OFFSETS),
            self.admin(),
            *(self.node_dicom(i) for i in nodes),
            *(self.node_http(i) for i in nodes),
        ]
