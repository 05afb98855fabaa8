"""A simulated PACS node: a pynetdicom SCP (C-ECHO, C-STORE, C-FIND, worklist) over the shared archive, and
a small status web server. Thread-based, beside the event loop; pynetdicom is imported where it is used."""

from __future__ import annotations

import html
import json
import logging
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pacslb.logs import log_event

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pynetdicom.events import EventHandlerType

from pacslb.demo.archive import Archive, answer, matches, worklist_items
from pacslb.demo.layout import (
    CHECK_CALLING_AE,
    HOST,
    HTTP_IDLE_TIMEOUT,
    LEVELS_BY_MODEL,
    MODALITY_WORKLIST_FIND,
    NODE_MAX_ASSOCIATIONS,
    PATIENT_ROOT_FIND,
    STATUS_CANCEL,
    STATUS_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    STATUS_PENDING,
    STATUS_SUCCESS,
    STUDY_ROOT_FIND,
    VERIFICATION,
    DemoPorts,
)

log = logging.getLogger("pacslb.demo")

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
