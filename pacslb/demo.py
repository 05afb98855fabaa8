"""The embedded demo (``pacslb demo``): three simulated PACS nodes behind the four INFINITT-style services.

What this module owns: the simulated nodes (a pynetdicom SCP and a small status web server each), the
demo study it generates for storescu, the balancer config it builds, and the banner telling a newcomer
what to try. What it must not do: balance anything itself. The balancing is the real engine
(:func:`pacslb.engine.serve`) running the config built here, so the demo shows the product, not a mock.

Theory of operation.

- Ports derive from one base (``--base-port``, default 10000), mirroring INFINITT's layout shifted into
  the unprivileged range: web base+80, dicom base+104, query base+105, mwl base+204. Node *i* (1..3)
  listens for DICOM on base+1100+i and for HTTP on base+1180+i. Everything binds 127.0.0.1 only.
- The nodes share one archive, as the nodes of a real PACS cluster share one database: a study sent
  through the dicom service can be found through the query service whichever node each lands on
  (the services keep separate persistence tables, so they may pick different nodes). What each node
  did itself (instances it received, requests it answered) is counted per node, which is what shows
  the balancing at work.
- Each node answers C-ECHO, C-STORE of every storage SOP class, C-FIND in the study- and patient-root
  models (built from the archive) and Modality Worklist C-FIND (a few fixed scheduled procedure steps).
  It accepts any called AE title: clients address the balancer (e.g. "INFINITT"), not the node.
- pynetdicom and http.server are thread-based; they run in their own threads beside the event loop and
  share nothing with it but the archive, which has its own lock.
- Lifecycle: generate the study, start the nodes, run the engine until SIGINT/SIGTERM, then stop the
  nodes and remove the temporary directory, whatever happened in between.
- pydicom and pynetdicom are imported where they are used, not at the top: the CLI imports this module
  to build its parser for every command, and those two take about half a second to import.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import html
import json
import logging
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import yaml

from pacslb.config import Config, load_config_text
from pacslb.errors import PacslbError
from pacslb.logs import log_event, setup_logging

if TYPE_CHECKING:
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pynetdicom.events import EventHandlerType

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


# -- the shared archive ------------------------------------------------------------------------------

# Attributes kept at each query level (PS3.4 C.6.1.1 / C.6.2.1; a useful subset, not every optional key).
PATIENT_KEYS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
)
SERIES_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
)
IMAGE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "ContentDate", "ContentTime")
LEVEL_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": PATIENT_KEYS,
    "STUDY": PATIENT_KEYS + STUDY_KEYS,
    "SERIES": PATIENT_KEYS + STUDY_KEYS + SERIES_KEYS,
    "IMAGE": PATIENT_KEYS + STUDY_KEYS + SERIES_KEYS + IMAGE_KEYS,
}
#: The attribute that identifies one record at each level.
LEVEL_UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


class Archive:
    """The cluster's shared store of received instances, in memory. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[str, Dataset] = {}

    def add(self, dataset: Dataset) -> None:
        """Keep ``dataset``; an instance sent again replaces the earlier copy, as a PACS would."""
        with self._lock:
            self._instances[str(dataset.get("SOPInstanceUID", ""))] = dataset

    def snapshot(self) -> list[Dataset]:
        with self._lock:
            return list(self._instances.values())

    def summary(self) -> dict[str, Any]:
        """Counts and study UIDs, for the status page."""
        instances = self.snapshot()
        studies = sorted({str(ds.get("StudyInstanceUID", "")) for ds in instances})
        patients = {str(ds.get("PatientID", "")) for ds in instances}
        return {
            "instances": len(instances),
            "studies": len(studies),
            "patients": len(patients),
            "study_uids": studies,
        }

    def records(self, level: str) -> list[Dataset]:
        """One record per patient, study, series or image: the attributes a C-FIND at ``level`` can match.

        Records carry the attributes of the levels above theirs too, so a query that names a study at
        SERIES level (the usual hierarchical query) matches on it.
        """
        groups: dict[str, list[Dataset]] = {}
        for ds in self.snapshot():
            groups.setdefault(str(ds.get(LEVEL_UNIQUE_KEY[level], "")), []).append(ds)
        return [_level_record(level, members) for members in groups.values()]


def _level_record(level: str, members: list[Dataset]) -> Dataset:
    from pydicom.dataset import Dataset

    first = members[0]
    record = Dataset()
    for keyword in ("SpecificCharacterSet", *LEVEL_KEYS[level]):
        if keyword in first:
            record[keyword] = copy.deepcopy(first[keyword])
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in members}
    if level == "PATIENT":
        record.NumberOfPatientRelatedStudies = len({str(ds.get("StudyInstanceUID", "")) for ds in members})
        record.NumberOfPatientRelatedSeries = len(series)
        record.NumberOfPatientRelatedInstances = len(members)
    elif level == "STUDY":
        record.ModalitiesInStudy = sorted({str(ds.Modality) for ds in members if "Modality" in ds})
        record.NumberOfStudyRelatedSeries = len(series)
        record.NumberOfStudyRelatedInstances = len(members)
    elif level == "SERIES":
        record.NumberOfSeriesRelatedInstances = len(members)
    return record


# -- C-FIND matching (PS3.4 C.2.2.2) -----------------------------------------------------------------

#: VRs whose values may use the wildcards * and ? (PS3.4 C.2.2.2.4).
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
#: VRs with range matching, and the digits of their normalised form (PS3.4 C.2.2.2.5).
RANGE_WIDTH = {"DA": 8, "TM": 6, "DT": 14}
#: Keys that steer the query instead of matching anything.
CONTROL_KEYWORDS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"})


def _values(element: DataElement) -> list[str]:
    if element.is_empty:
        return []
    if element.VM > 1:
        return [str(v) for v in element.value]
    return [str(element.value)]


def _normalise(vr: str, text: str, fill: str) -> str:
    # Range bounds may be shorter than a full value ("0900" for 09:00:00): pad so string order is time order.
    digits = text.replace(":", "").split(".")[0]
    return (digits + fill * RANGE_WIDTH[vr])[: RANGE_WIDTH[vr]]


def _value_matches(vr: str, wanted: str, have: str) -> bool:
    if vr in RANGE_WIDTH and "-" in wanted:
        low, _, high = wanted.partition("-")
        value = _normalise(vr, have, "0")
        return (not low or value >= _normalise(vr, low, "0")) and (not high or value <= _normalise(vr, high, "9"))
    flags = re.IGNORECASE if vr == "PN" else 0  # PACS commonly match names regardless of case
    if vr in WILDCARD_VRS and ("*" in wanted or "?" in wanted):
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in wanted)
        return re.fullmatch(pattern, have, flags | re.DOTALL) is not None
    return wanted.casefold() == have.casefold() if flags else wanted == have


def _is_universal(element: DataElement) -> bool:
    """True when a key matches everything: empty, or a sequence whose single item has only such keys."""
    if element.VR == "SQ":
        return not element.value or all(_is_universal(e) for e in element.value[0])
    return element.is_empty


def matches(query: Dataset, record: Dataset) -> bool:
    """Whether ``record`` matches every key of the C-FIND identifier ``query``."""
    for element in query:
        if element.keyword in CONTROL_KEYWORDS or element.tag.element == 0 or _is_universal(element):
            continue
        if element.tag not in record:
            return False
        have = record[element.tag]
        if element.VR == "SQ":
            # Sequence matching (C.2.2.2.6): some item of the record must match the query's item.
            if not any(matches(element.value[0], item) for item in have.value):
                return False
            continue
        # Several values in the query (a UID list, or "CT\MR") mean any of them; a multi-valued record
        # attribute (ModalitiesInStudy "CT\MR") matches when any of its values does.
        if not any(_value_matches(element.VR, w, h) for w in _values(element) for h in _values(have)):
            return False
    return True


def answer(query: Dataset, record: Dataset) -> Dataset:
    """The C-FIND response identifier: the record's values for exactly the keys the query asked for."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    out = Dataset()
    if "SpecificCharacterSet" in record:
        out.SpecificCharacterSet = record.SpecificCharacterSet
    for element in query:
        if element.keyword in CONTROL_KEYWORDS:
            out[element.tag] = copy.deepcopy(element)
        elif element.VR == "SQ":
            items = record[element.tag].value if element.tag in record else []
            if element.value:
                wanted = element.value[0]
                chosen = [answer(wanted, item) for item in items if matches(wanted, item)]
            else:
                chosen = [copy.deepcopy(item) for item in items]
            out.add_new(element.tag, "SQ", Sequence(chosen))
        elif element.tag in record:
            out[element.tag] = copy.deepcopy(record[element.tag])
        else:
            out.add_new(element.tag, element.VR, None)
    return out


# -- the worklist ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Order:
    """One scheduled exam of the demo worklist (one requested procedure with one step)."""

    patient_name: str
    patient_id: str
    sex: str
    birth_date: str
    accession: str
    modality: str
    station_ae: str
    start_time: str
    description: str


#: The demo's worklist: two modalities, so a Modality filter visibly filters.
WORKLIST: tuple[Order, ...] = (
    Order("DOE^JANE", "MWL-0001", "F", "19700412", "ACC-1001", "CT", "CT01", "090000", "CT chest"),
    Order("ROE^RICHARD", "MWL-0002", "M", "19581103", "ACC-1002", "MR", "MR01", "101500", "MR brain"),
    Order("SMITH^ANNA", "MWL-0003", "F", "19891230", "ACC-1003", "CT", "CT02", "113000", "CT abdomen"),
)


def worklist_items(today: datetime.date | None = None) -> list[Dataset]:
    """The worklist as MWL records, scheduled for ``today``; the same on every node (one cluster, one RIS)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    day = (today or datetime.date.today()).strftime("%Y%m%d")
    items: list[Dataset] = []
    for number, order in enumerate(WORKLIST, 1):
        step = Dataset()
        step.Modality = order.modality
        step.ScheduledStationAETitle = order.station_ae
        step.ScheduledProcedureStepStartDate = day
        step.ScheduledProcedureStepStartTime = order.start_time
        step.ScheduledProcedureStepDescription = order.description
        step.ScheduledProcedureStepID = f"SPS-{number:04d}"
        step.ScheduledPerformingPhysicianName = ""
        item = Dataset()
        item.SpecificCharacterSet = "ISO_IR 100"
        item.PatientName = order.patient_name
        item.PatientID = order.patient_id
        item.PatientSex = order.sex
        item.PatientBirthDate = order.birth_date
        item.AccessionNumber = order.accession
        item.RequestedProcedureID = f"RP-{number:04d}"
        item.RequestedProcedureDescription = order.description
        # Stable across restarts and nodes, so one order has one study UID everywhere.
        item.StudyInstanceUID = generate_uid(entropy_srcs=["pacslb-demo-worklist", order.accession])
        item.ReferringPhysicianName = "WELBY^MARCUS"
        item.ScheduledProcedureStepSequence = Sequence([step])
        items.append(item)
    return items


# -- a simulated node --------------------------------------------------------------------------------


@dataclass
class NodeCounters:
    """What one node did for clients (health checks left out). Guarded by the node's lock."""

    echo: int = 0
    store: int = 0
    find: int = 0
    worklist: int = 0
    received_studies: set[str] = field(default_factory=set)


class SimulatedNode:
    """One PACS node: a DICOM SCP (pynetdicom) and a status web page (http.server), both on 127.0.0.1."""

    def __init__(self, index: int, ports: DemoPorts, archive: Archive) -> None:
        self.name = f"pacs{index}"
        self.ae_title = f"PACS{index}"
        self.dicom_port = ports.node_dicom(index)
        self.http_port = ports.node_http(index)
        self.archive = archive
        self.counters = NodeCounters()
        self._lock = threading.Lock()
        self._ae: Any = None
        self._http: _NodeHTTPServer | None = None
        self._http_thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> None:
        """Bind and serve both ports. Raises OSError when a port cannot be bound (nothing is left open)."""
        from pynetdicom import AE, _config, evt

        # Storage of every SOP class (private and future ones too) in whatever transfer syntax the sender
        # proposes first. Listing pynetdicom's 170 storage classes instead costs every association a
        # deep copy of them all: 36 ms of CPU per C-ECHO instead of 15 (measured), which under load
        # made the balancer's first round of health checks time out. The flag is process-wide but only
        # steers pynetdicom as an association *acceptor*, which in a pacslb process only these nodes are.
        _config.UNRESTRICTED_STORAGE_SERVICE = True

        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = NODE_MAX_ASSOCIATIONS
        # Clients call the balancer's AE title, never the node's: accept whatever they call us.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        for sop_class in (VERIFICATION, PATIENT_ROOT_FIND, STUDY_ROOT_FIND, MODALITY_WORKLIST_FIND):
            ae.add_supported_context(sop_class)
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
        ]
        ae.start_server((HOST, self.dicom_port), block=False, evt_handlers=handlers)
        self._ae = ae
        try:
            self._http = _NodeHTTPServer((HOST, self.http_port), self)
        except OSError:
            self.stop()
            raise
        self._http_thread = threading.Thread(target=self._http.serve_forever, name=f"{self.name}-http", daemon=True)
        self._http_thread.start()

    def stop(self) -> None:
        """Stop both servers and abort the node's open associations. Safe to call more than once."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    # status

    def status(self) -> dict[str, Any]:
        with self._lock:
            requests = {
                "echo": self.counters.echo,
                "store": self.counters.store,
                "find": self.counters.find,
                "worklist": self.counters.worklist,
            }
            received = {"instances": self.counters.store, "studies": len(self.counters.received_studies)}
        return {
            "node": self.name,
            "ae_title": self.ae_title,
            "dicom": f"{HOST}:{self.dicom_port}",
            "received": received,
            "requests": requests,
            "archive": self.archive.summary(),
        }

    # DICOM handlers (pynetdicom calls them from its association threads)

    def _client(self, event: Any) -> tuple[str, bool]:
        calling = str(event.assoc.requestor.ae_title).strip()
        return calling, calling == CHECK_CALLING_AE

    def _on_echo(self, event: Any) -> int:
        calling, is_check = self._client(event)
        if not is_check:
            with self._lock:
                self.counters.echo += 1
        log_event(log, "node_echo", logging.DEBUG if is_check else logging.INFO, node=self.name, calling_ae=calling)
        return STATUS_SUCCESS

    def _on_store(self, event: Any) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        self.archive.add(dataset)
        calling, _ = self._client(event)
        with self._lock:
            self.counters.store += 1
            self.counters.received_studies.add(str(dataset.get("StudyInstanceUID", "")))
            count = self.counters.store
        log_event(
            log,
            "node_store",
            node=self.name,
            calling_ae=calling,
            modality=dataset.get("Modality", ""),
            sop_instance=dataset.get("SOPInstanceUID", ""),
            received=count,
        )
        return STATUS_SUCCESS

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        query: Dataset = event.identifier
        model = str(event.request.AffectedSOPClassUID)
        calling, is_check = self._client(event)
        if model == MODALITY_WORKLIST_FIND:
            kind, records = "worklist", worklist_items()
        else:
            level = str(query.get("QueryRetrieveLevel", ""))
            if level not in LEVELS_BY_MODEL.get(model, ()):
                log_event(
                    log,
                    "node_find_refused",
                    logging.WARNING,
                    node=self.name,
                    calling_ae=calling,
                    level=level or "-",
                )
                yield STATUS_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
                return
            kind, records = "find", self.archive.records(level)
        if not is_check:
            with self._lock:
                if kind == "worklist":
                    self.counters.worklist += 1
                else:
                    self.counters.find += 1
        found = 0
        for record in records:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            if matches(query, record):
                found += 1
                yield STATUS_PENDING, answer(query, record)
        log_event(log, f"node_{kind}", node=self.name, calling_ae=calling, matches=found)


def stop_nodes(nodes: Iterable[SimulatedNode]) -> None:
    """Stop every node, all at once: each waits up to half a second for its servers' poll loops."""
    threads = [threading.Thread(target=node.stop, name=f"{node.name}-stop") for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# -- the node's web page -----------------------------------------------------------------------------


class _NodeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the demo from exiting

    def __init__(self, address: tuple[str, int], node: SimulatedNode) -> None:
        self.node = node
        super().__init__(address, _NodeRequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up early is normal here (a health check that has seen the status line, a
        # balancer closing at shutdown); the default prints a traceback to stderr for each one.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            log.debug("%s: client %s hung up: %s", self.node.name, client_address, error)
        else:
            log.exception("%s: error answering %s", self.node.name, client_address)


class _NodeRequestHandler(BaseHTTPRequestHandler):
    """``/``: an HTML page naming the node; ``/status``: the same as JSON. HEAD answers like GET, bodiless."""

    server: _NodeHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, so a browser's requests through the balancer reuse a node
    timeout = HTTP_IDLE_TIMEOUT

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        status = self.server.node.status()
        if path == "/":
            body, content_type = _status_page(status).encode(), "text/html; charset=utf-8"
        elif path == "/status":
            body, content_type = (json.dumps(status) + "\n").encode(), "application/json"
        else:
            self.send_error(404, "Not Found")  # omits the body itself for HEAD
            return
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # every reload must show who answered now
        self.send_header("X-PACS-Node", status["node"])
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request to stderr; the web health check alone would flood it.
        log.debug("%s %s", self.server.node.name, format % args)


def _status_page(status: dict[str, Any]) -> str:
    node = html.escape(status["node"])
    received, archive, requests = status["received"], status["archive"], status["requests"]
    rows = "".join(f"<tr><td>{html.escape(kind)}</td><td>{count}</td></tr>" for kind, count in requests.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{node}: pacslb demo</title></head>
<body style="font-family: sans-serif">
<h1>{node} answered</h1>
<p>AE title {html.escape(status["ae_title"])}, DICOM {html.escape(status["dicom"])}.</p>
<p>This node received {received["instances"]} instance(s) of {received["studies"]} study(ies).
The cluster archive it shares holds {archive["instances"]} instance(s) of {archive["studies"]} study(ies).</p>
<table><tr><th>requests from clients</th><th>count</th></tr>{rows}</table>
<p>Reload: with source-IP persistence you stay on {node}; with <code>pacslb demo --no-persistence</code>
each new connection may go to another node. JSON: <a href="/status">/status</a>.</p>
</body></html>
"""


# -- the demo study ----------------------------------------------------------------------------------


def write_demo_study(directory: Path, count: int = DEMO_STUDY_INSTANCES) -> str:
    """Write ``count`` CT images of one new study into ``directory``; return its Study Instance UID.

    The images are pydicom's bundled CT_small.dcm with new UIDs, so every demo run sends a study that
    no node has seen yet.
    """
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = get_testdata_file("CT_small.dcm", download=False)  # download=False: never touch the network
    if source is None:
        raise PacslbError("pydicom's test file CT_small.dcm is missing; reinstall pydicom")
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    today = datetime.date.today().strftime("%Y%m%d")
    template = dcmread(source)
    thickness = float(template.get("SliceThickness", 5.0))
    for number in range(1, count + 1):
        ds = copy.deepcopy(template)
        sop_uid = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.PatientName = DEMO_PATIENT_NAME
        ds.PatientID = DEMO_PATIENT_ID
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyDescription = "pacslb demo study"
        ds.SeriesDescription = "demo CT series"
        ds.AccessionNumber = "PACSLB-0001"
        ds.InstanceNumber = number
        # Consecutive slices, so a viewer that sorts by position shows a plausible stack.
        position = [float(v) for v in ds.ImagePositionPatient]
        position[2] += (number - 1) * thickness
        ds.ImagePositionPatient = position
        ds.SliceLocation = position[2]
        ds.save_as(directory / f"CT{number:03d}.dcm", enforce_file_format=True)
    return study_uid


# -- the balancer config -----------------------------------------------------------------------------


def build_config_text(ports: DemoPorts, persistence: str) -> str:
    """The YAML config of the four services in front of the simulated nodes.

    Args:
        ports: the demo's ports.
        persistence: "source_ip" or "none".
    """
    nodes = range(1, NODE_COUNT + 1)
    dicom_servers = {f"pacs{i}": f"{HOST}:{ports.node_dicom(i)}" for i in nodes}
    web_servers = {f"pacs{i}": f"{HOST}:{ports.node_http(i)}" for i in nodes}
    sticky: dict[str, str] = {"type": persistence}
    if persistence != "none":
        sticky["timeout"] = PERSISTENCE_TIMEOUT
    timing = {"interval": CHECK_INTERVAL, "timeout": CHECK_TIMEOUT}
    echo_check = {"type": "dicom_echo", "calling_ae": CHECK_CALLING_AE, "called_ae": "ANY-SCP", **timing}
    web_check = {"type": "http", "method": "GET", "path": "/status", "expect_status": [200], **timing}

    def service(name: str, mode: str, check: dict[str, Any], servers: dict[str, str]) -> dict[str, Any]:
        persistence = dict(sticky)
        if mode == "http" and persistence["type"] != "none":
            persistence["type"] = "cookie+source_ip"  # the INFINITT web service: cookie, source IP as fallback
        return {
            "listen": f"{HOST}:{ports.service(name)}",
            "mode": mode,
            "balance": "leastconn",
            "persistence": persistence,
            "check": dict(check),
            "servers": dict(servers),
        }

    config = {
        "services": {
            "web": service("web", "http", web_check, web_servers),
            "dicom": service("dicom", "dicom", echo_check, dicom_servers),
            "query": service("query", "dicom", echo_check, dicom_servers),
            "mwl": service("mwl", "dicom", echo_check, dicom_servers),
        },
        "admin": {"listen": f"{HOST}:{ports.admin()}"},
        "log": {"format": "text", "level": "info"},
        "shutdown_grace": SHUTDOWN_GRACE,
    }
    return yaml.safe_dump(config, sort_keys=False)


# -- the banner --------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """``path`` as typed in a shell in the current directory: relative below it, absolute elsewhere."""
    try:
        text = str(path.relative_to(Path.cwd()))
    except ValueError:
        return shlex.quote(str(path))
    return shlex.quote(text if "/" in text else f"./{text}")


def own_commands() -> tuple[str, str]:
    """How to run this pacslb and the Python that has pynetdicom, as typed in a *new* shell in the current
    directory, where no virtual environment is active: ``.venv/bin/pacslb`` and ``.venv/bin/python`` after
    ``make demo``; plain ``pacslb`` only where that name on PATH is this very command, outside a venv."""
    python = Path(sys.executable)
    script = python.parent / "pacslb"
    in_venv = sys.prefix != sys.base_prefix
    on_path = shutil.which("pacslb")
    if not in_venv and on_path and script.exists() and Path(on_path).resolve() == script.resolve():
        pacslb = "pacslb"
    elif script.exists():
        pacslb = _shown(script)
    else:
        pacslb = f"{_shown(python)} -m pacslb"
    return pacslb, _shown(python)


def banner(ports: DemoPorts, nodes: Iterable[SimulatedNode], study_dir: Path, persistence: str) -> str:
    """What the user reads once the balancer listens. The first line says "ready" (tests wait for it).

    Every indented line that starts with a command works as printed when pasted into a new shell in the
    directory the demo was started from (tests/integration/test_demo.py pastes them); dcmtk's tools get
    ``-v`` so that a success shows something.
    """
    web, dicom, query, mwl = (ports.service(n) for n in ("web", "dicom", "query", "mwl"))
    files = f"{shlex.quote(str(study_dir))}/*.dcm"
    sticky = f"source_ip, {PERSISTENCE_TIMEOUT}" if persistence != "none" else "none"
    pacslb, python = own_commands()
    admin = f"http://{HOST}:{ports.admin()}"
    lines = [
        f"pacslb demo ready: 4 services in front of {NODE_COUNT} simulated PACS nodes. Ctrl-C stops it.",
        "",
        f"Services on {HOST} (balance leastconn, persistence {sticky}, checks every {CHECK_INTERVAL}):",
        f"  web    {HOST}:{web:<6} mode http: viewer stand-in  (check: GET /status)",
        f"  dicom  {HOST}:{dicom:<6} mode dicom: C-ECHO, C-STORE (check: C-ECHO)",
        f"  query  {HOST}:{query:<6} mode dicom: C-FIND          (check: C-ECHO)",
        f"  mwl    {HOST}:{mwl:<6} mode dicom: worklist C-FIND (check: C-ECHO)",
        "  (mode dicom reads each association's request: a node that is down, busy or hung is skipped before",
        "  the modality notices, and with no node left it is told to retry later, rather than cut off.)",
        f"Dashboard: {admin}/",
        "Nodes (one shared archive, as in a real cluster):",
        *(f"  {n.name}  AE {n.ae_title}  DICOM {HOST}:{n.dicom_port}  web http://{HOST}:{n.http_port}/" for n in nodes),
        f"Demo study: {DEMO_STUDY_INSTANCES} CT images in {study_dir}",
        "",
        f"Try, in another shell in this directory (dcmtk: apt install dcmtk; any called AE title works, {BALANCER_AE}"
        " here):",
        f"  echoscu -v -aec {BALANCER_AE} {HOST} {dicom}",
        f"  storescu -v -aec {BALANCER_AE} {HOST} {dicom} {files}",
        f"  findscu -v -S -aec {BALANCER_AE} -k QueryRetrieveLevel=STUDY -k StudyInstanceUID -k PatientName "
        f"{HOST} {query}",
        f'  findscu -v -W -aec {BALANCER_AE} -k PatientName -k "ScheduledProcedureStepSequence[0].Modality=CT" '
        f"{HOST} {mwl}",
        f"  curl -i http://{HOST}:{web}/",
        f"  {pacslb} status --admin {admin}",
        "Without dcmtk, pynetdicom's apps take the same options, e.g.",
        f"  {python} -m pynetdicom echoscu -v -aec {BALANCER_AE} {HOST} {dicom}",
        "",
    ]
    if persistence != "none":
        lines += [
            "Persistence is source_ip (the web service: a cookie, then source_ip): every connection from this",
            "machine lands on the node it reached first, per service. The log below names the node that",
            "answered each request, as does the page.",
            "To watch leastconn spread connections over the nodes instead, stop this one (Ctrl-C), then:",
            f"  {pacslb} demo --no-persistence",
        ]
    else:
        lines += [
            "Persistence is off (--no-persistence): each new connection goes to the node with the fewest",
            "connections, so repeated echoscu or curl runs move between nodes; the log below shows which.",
        ]
    return "\n".join(lines)


# -- entry points ------------------------------------------------------------------------------------


def _base_port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not MIN_BASE_PORT <= value <= MAX_BASE_PORT:
        raise argparse.ArgumentTypeError(
            f"must be between {MIN_BASE_PORT} and {MAX_BASE_PORT} (the demo uses ports up to base+"
            f"{NODE_HTTP_OFFSET + NODE_COUNT})"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to its subcommand parser."""
    parser.add_argument(
        "--base-port",
        type=_base_port,
        default=DEFAULT_BASE_PORT,
        metavar="PORT",
        help=f"services listen on PORT+80 (web), +104 (dicom), +105 (query), +204 (mwl); nodes on "
        f"PORT+1101.. (DICOM) and PORT+1181.. (HTTP); default {DEFAULT_BASE_PORT}",
    )
    parser.add_argument(
        "--no-persistence",
        action="store_true",
        help="balance every new connection (persistence none) instead of keeping a client on its node",
    )


def _stop_during_startup(signum: int, frame: FrameType | None) -> NoReturn:
    # Until the engine installs its own handlers, SIGTERM would kill the process before the nodes are
    # stopped and the temporary directory removed; turn it into an exception the cleanup runs after.
    raise KeyboardInterrupt


def _run(config: Config, on_ready: Callable[[], None]) -> None:
    from pacslb.engine import serve

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency wherever it builds
        runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner:
        runner.run(serve(config, None, on_ready=on_ready))


def main(args: argparse.Namespace) -> int:
    """Run the demo until SIGINT or SIGTERM.

    Returns:
        The exit code: 0 after a clean stop, 1 when the demo cannot start (a port is taken).
    """
    setup_logging()
    # `pacslb run` without a config comes here too, with base_port None.
    base = getattr(args, "base_port", None) or DEFAULT_BASE_PORT
    persistence = "none" if getattr(args, "no_persistence", False) else "source_ip"
    ports = DemoPorts(base)
    # signal.signal only works in the main thread; called elsewhere (embedding), the engine's own
    # handlers are all there is.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_during_startup) if in_main_thread else None
    workdir = Path(tempfile.mkdtemp(prefix="pacslb-demo-"))
    archive = Archive()
    nodes = [SimulatedNode(i, ports, archive) for i in range(1, NODE_COUNT + 1)]
    try:
        study_dir = workdir / "study"
        study_uid = write_demo_study(study_dir)
        log_event(log, "demo_study", directory=str(study_dir), study=study_uid, instances=DEMO_STUDY_INSTANCES)
        for node in nodes:
            try:
                node.start()
            except OSError as exc:
                log_event(
                    log,
                    "demo_start_failed",
                    logging.ERROR,
                    node=node.name,
                    dicom_port=node.dicom_port,
                    http_port=node.http_port,
                    reason=exc.strerror or str(exc),
                    hint="choose other ports with --base-port",
                )
                return 1
            log_event(
                log,
                "node_started",
                node=node.name,
                ae_title=node.ae_title,
                dicom_port=node.dicom_port,
                http_port=node.http_port,
            )
        config = load_config_text(build_config_text(ports, persistence), "<demo>")
        text = banner(ports, nodes, study_dir, persistence)

        def on_ready() -> None:
            print(text, flush=True)

        try:
            _run(config, on_ready)
        except PacslbError as exc:  # e.g. the engine's StartError: a service port is taken
            log_event(
                log,
                "demo_start_failed",
                logging.ERROR,
                reason=str(exc),
                hint="choose other ports with --base-port",
            )
            return 1
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM before the engine ran: a normal stop
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        stop_nodes(nodes)
        shutil.rmtree(workdir, ignore_errors=True)
        log_event(log, "demo_stopped")
    return 0
