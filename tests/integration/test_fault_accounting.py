"""Permanent faults and image accounting: every instance a modality was told is stored, is stored.

A modality sends a study instance by instance, and forgets each instance whose C-STORE-RSP said
Success; whatever else it was sending it sends again later. So the one thing a fault may never do is
acknowledge an instance that no node keeps. Each test here sends a study through pacslb (``mode: tcp``
and ``mode: dicom``) to Orthanc nodes with a real client, makes one fault happen in the middle of the
association, and then counts:

- acknowledged: SOP Instance UIDs the client was told were stored (storescu's ``-v`` output: each
  "Received Store Response (Success)" after its "Sending file: PATH"; pynetdicom: each status 0x0000);
- stored: the study's instances some node holds after the fault (each node's REST API);
- lost: acknowledged but not stored, which must be 0;
- resent: what the client then sends again in a new association, as a modality does (what was not
  acknowledged); after that the whole study must be stored.

The faults: (a) the node receiving the association is killed with SIGKILL; (b) pacslb itself is
killed with SIGKILL and started again with the same config (its admin state file keeps its
persistence table, so the resent part follows the first); (c) 20 reloads (SIGHUP), alternately a
weight changed and the receiving node removed from or put back into the config; (d) the receiving
node is drained (nothing may fail); (e) it is halted with a short ``halt_grace`` (the association
goes on for the grace, then it is cut).

The clients are dcmtk's storescu and pynetdicom. pynetdicom sends one instance at a time, so the fault
comes after its Nth acknowledgment, between two requests. storescu runs on its own: it talks to pacslb
through :class:`Gate`, an in-process TCP proxy that counts the C-STORE responses going back to it and
holds its next request once N of them have passed, so the fault lands at a known point with no sleep.
For the kills (a, b) the gate lets request N+1 reach the node and holds its response instead: the
instance is stored and its acknowledgment is in flight when the connection is cut, the case where a
modality resends an instance the PACS already has. Every wait is on an event (a response, a log line,
a node's state, a file) and bounded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import peers
import pydicom
import pytest
from peers import OrthancCluster, OrthancNode, PacslbProcess, Study

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]

#: Instances per study, and how many are acknowledged before the fault (the association is then in
#: its middle). The reload test needs one instance per reload and a few more.
STUDY_SIZE = 12
FAULT_AFTER = 4
RELOADS = 20
RELOAD_STUDY_SIZE = RELOADS + 4
#: A halted node's associations go on this long, then pacslb cuts them. Long enough that one more
#: instance (milliseconds) certainly passes during it on a busy machine, short enough to keep the test short.
HALT_GRACE = 1.0
#: Bound on every wait for an event that normally takes milliseconds (a response, a log line, a restart).
WITHIN = 20.0
#: The memory store writes its snapshot every 5 s (pacslb/state/memory.py): a pin is on disk within that.
SNAPSHOT_WITHIN = 5.0 + WITHIN
#: storescu's own timeouts: connect and ACSE 10 s; DIMSE 30 s, longer than the gate ever holds a request.
STORESCU_TIMEOUTS = ("-to", "10", "-ta", "10", "-td", "30")
#: Source addresses: storescu (through the gate) comes from 127.0.0.1; the others are chosen.
PYNETDICOM_SOURCE = "127.0.0.2"
PROBE_SOURCE = "127.0.0.3"

CHECK = {"type": "tcp", "interval": "300ms", "timeout": "300ms", "rise": 2, "fall": 2}
MODES = ["tcp", "dicom"]
CLIENTS = ["storescu", "pynetdicom"]


# ------------------------------------------------------------------------------------------- the nodes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancCluster]:
    """Three Orthanc nodes shared by the module (each test sends a study of its own, with fresh UIDs)."""
    cluster = OrthancCluster(tmp_path_factory.mktemp("orthanc"))
    try:
        cluster.start(3)
        yield cluster
    finally:
        cluster.discard()


@pytest.fixture
def nodes(cluster: OrthancCluster) -> list[OrthancNode]:
    """The three nodes, every one running (a test that killed one and failed may have left it down)."""
    for node in cluster.nodes:
        if not node.running():
            node.start()
    return cluster.nodes


def held(node: OrthancNode, study: Study) -> set[str]:
    """SOP Instance UIDs of ``study`` that ``node`` stores (Orthanc's REST API, /tools/find)."""
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study.study_uid}, "Expand": True}
    response = httpx.post(f"{node.url}/tools/find", json=query, timeout=10.0, trust_env=False)
    response.raise_for_status()
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in response.json()} & study.sop_uids


def stored_anywhere(nodes: list[OrthancNode], study: Study) -> dict[str, set[str]]:
    """Per node, what it holds of the study."""
    return {node.name: held(node, study) for node in nodes}


def receiving_node(nodes: list[OrthancNode], study: Study) -> OrthancNode:
    """The node the association went to: the one holding the acknowledged first instances."""
    holders = [node for node in nodes if held(node, study)]
    assert len(holders) == 1, f"the first instances are on {[n.name for n in holders]}"
    return holders[0]


# ------------------------------------------------------------------------------------------- the gate


def _command_ends(pdu: bytes) -> int:
    """How many DIMSE command sets end in this PDU: the PDVs of a P-DATA-TF (PS3.8 9.3.5) whose message
    control header says "command, last fragment" (0b11). Going to a storage SCU, each is one response."""
    if pdu[0] != peers.PDU_P_DATA_TF:
        return 0
    count, at = 0, 6
    while at + 6 <= len(pdu):
        length = int.from_bytes(pdu[at : at + 4], "big")
        if pdu[at + 5] & 0x03 == 0x03:
            count += 1
        at += 4 + length
    return count


class Gate:
    """A TCP proxy on 127.0.0.1 in front of pacslb that counts the DIMSE responses sent back to the
    client and forwards the client's bytes only while fewer than ``allowance`` responses have passed.

    A storage SCU sends its next C-STORE-RQ only after the previous response, so with ``allowance`` N,
    the client gets N acknowledgments and its request N+1 waits in the gate until the test lets it go
    (:meth:`allow`, :meth:`release`). With :meth:`hold_response` the gate lets request N+1 reach the
    node and holds its response instead: the instance is stored, its acknowledgment on the way. If the
    server side then closes, the held response is dropped, as it is when the connection carrying it
    is cut before it reaches the client. Bytes are not changed. When one side closes or fails, both
    sides are closed, as a balancer's relay does. A context manager; every thread is joined on exit.
    """

    def __init__(self, upstream_port: int) -> None:
        self.port = peers.free_port()
        self.upstream_port = upstream_port
        self.responses = 0
        self.allowance: float = math.inf
        self.response_allowance: float = math.inf
        self.holding = False  # a response is held (see hold_response)
        self.dropped = 0  # responses dropped because the server side closed while they were held
        self.connections = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> Gate:
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(8)
        self._listener.settimeout(0.1)
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for sock in list(self._sockets):
            _close(sock)
        for thread in self._threads:
            thread.join(5.0)
        self._listener.close()

    def allow(self, responses: float) -> None:
        """Let the client's bytes through until ``responses`` responses have passed."""
        with self._cond:
            self.allowance = responses
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self.allowance = self.response_allowance = math.inf
            self._cond.notify_all()

    def hold_response(self) -> None:
        """Let the client's next request through and hold its response (after the ones already passed)."""
        with self._cond:
            self.response_allowance = self.responses
            self.allowance = self.responses + 1
            self._cond.notify_all()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"gate-{self.port}")
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=WITHIN)
            except OSError:
                _close(client)
                continue
            self.connections += 1
            for sock in (client, server):
                sock.settimeout(None)
                self._sockets.append(sock)
            self._spawn(self._upstream, client, server)
            self._spawn(self._downstream, server, client)

    def _upstream(self, client: socket.socket, server: socket.socket) -> None:
        """Client to server, held at the allowance."""
        try:
            while data := client.recv(65536):
                with self._cond:
                    self._cond.wait_for(lambda: self.responses < self.allowance or self._stop.is_set(), 3 * WITHIN)
                if self._stop.is_set():
                    return
                server.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, server)

    def _downstream(self, server: socket.socket, client: socket.socket) -> None:
        """Server to client, whole PDUs at a time, counting each response as it passes. (Counted once
        the client had it, a response let the client's next request through the upstream check before the
        count caught up: one acknowledgment more than the test allowed, seen once.)"""
        buffer = b""
        try:
            while data := server.recv(65536):
                buffer += data
                while len(buffer) >= 6 and len(buffer) >= 6 + int.from_bytes(buffer[2:6], "big"):
                    size = 6 + int.from_bytes(buffer[2:6], "big")
                    pdu, buffer = buffer[:size], buffer[size:]
                    ends = _command_ends(pdu)
                    if ends and not self._wait_to_pass(ends, server):
                        self.dropped += ends
                        return
                    if ends:  # counted before the client has it: it may send its next request at once
                        with self._cond:
                            self.responses += ends
                            self._cond.notify_all()
                    client.sendall(pdu)
        except OSError:
            pass
        finally:
            _close(server, client)

    def _wait_to_pass(self, ends: int, server: socket.socket) -> bool:
        """Wait (bounded) until responses may pass; False when the server side closed meanwhile."""
        deadline = time.monotonic() + 3 * WITHIN
        with self._cond:
            while self.responses + ends > self.response_allowance and not self._stop.is_set():
                self.holding = True
                if _closed(server) or time.monotonic() > deadline:
                    return False
                self._cond.wait(0.02)
            self.holding = False
        return not self._stop.is_set()


def _closed(sock: socket.socket) -> bool:
    """The peer closed or reset the connection (nothing is read)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


# ------------------------------------------------------------------------------------------ the clients


@dataclass
class Sent:
    """What one association did, as the client saw it."""

    acknowledged: list[str]  # SOP Instance UIDs answered with Success, in order
    failed: bool  # the association did not end normally (the client reported an error)
    detail: str  # the client's output, or what went wrong


class Sender(Protocol):
    """One association sending a study, paused after ``n`` acknowledgments and resumed by the test."""

    def start(self, n: int) -> None: ...
    def step(self, count: int = 1) -> None: ...
    def finish(self) -> Sent: ...
    def stop(self) -> None: ...


class StorescuSender:
    """dcmtk's storescu sending the study's files (one association) through a :class:`Gate`."""

    def __init__(self, lb_port: int, files: list[Path], log: Path) -> None:
        self.files = files
        self.uid_of = {str(path): peers.read_sop_uid(path) for path in files}
        self.log = log
        self.gate = Gate(lb_port).__enter__()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, n: int) -> None:
        self.gate.allow(n)
        args = [str(peers.DCMTK_BIN / "storescu"), "-v", *STORESCU_TIMEOUTS, "-aet", "MODALITY", "-aec", "ANY-SCP"]
        args += ["127.0.0.1", str(self.gate.port), *map(str, self.files)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self._wait(n)

    def step(self, count: int = 1) -> None:
        self.gate.allow(self.gate.allowance + count)
        self._wait(int(self.gate.allowance))

    def in_flight(self) -> None:
        """Let the next instance reach the node and hold its acknowledgment (see :meth:`Gate.hold_response`)."""
        self.gate.hold_response()
        peers.wait_for(lambda: self.gate.holding, WITHIN, "the next response to be held")

    def wait_cut(self) -> None:
        """Wait (bounded) until pacslb closed the client's connection with the response still held."""
        peers.wait_for(lambda: self.gate.dropped, WITHIN, "pacslb to close the client's connection")

    def _wait(self, n: int) -> None:
        def reached() -> bool:
            if self.gate.responses >= n:
                return True
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"storescu ended before {n} responses:\n{self.log.read_text(errors='replace')}")
            return False

        peers.wait_for(reached, WITHIN, f"storescu's response {n}")

    def finish(self) -> Sent:
        assert self.proc is not None
        self.gate.release()
        try:
            self.proc.wait(60.0)
        except subprocess.TimeoutExpired:
            pytest.fail(f"storescu still running 60 s later:\n{self.log.read_text(errors='replace')}")
        output = self.log.read_text(errors="replace")
        return Sent([self.uid_of[p] for p in storescu_acknowledged(output)], self.proc.returncode != 0, output)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)
        self.gate.__exit__()


def storescu_acknowledged(output: str) -> list[str]:
    """The files whose C-STORE storescu ``-v`` reported answered with Success: each "Received Store
    Response (Success)" belongs to the last "Sending file: PATH" before it."""
    acknowledged, current = [], None
    for line in output.splitlines():
        if m := re.search(r"Sending file: (.+)$", line):
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            current = None
    return acknowledged


class PynetdicomSender:
    """A pynetdicom association (from :data:`PYNETDICOM_SOURCE`) sending one instance at a time."""

    def __init__(self, lb_port: int, files: list[Path], source_ip: str = PYNETDICOM_SOURCE) -> None:
        self.datasets = [pydicom.dcmread(path) for path in files]
        self.client = peers.DicomClient(lb_port, source_ip, calling_ae="MODALITY")
        self.acknowledged: list[str] = []
        self.sent = 0
        self.failure = ""

    def start(self, n: int) -> None:
        self.client.open()
        self._send_until(n)
        assert len(self.acknowledged) == n, self.failure

    def step(self, count: int = 1) -> None:
        target = self.sent + count
        self._send_until(target)
        assert len(self.acknowledged) == target, self.failure

    def _send_until(self, n: int) -> None:
        while self.sent < min(n, len(self.datasets)) and not self.failure:
            ds = self.datasets[self.sent]
            try:
                status = self.client.assoc.send_c_store(ds)
            except RuntimeError as exc:  # the association is gone (pynetdicom refuses to send)
                self.failure = f"instance {self.sent + 1}: {exc}"
                return
            self.sent += 1
            code = int(status.Status) if status else -1
            if code == 0:
                self.acknowledged.append(str(ds.SOPInstanceUID))
            else:  # no response (-1) or a failure status: the modality stops and tries again later
                self.failure = f"instance {self.sent}: status {code:#06x}" if code >= 0 else "no response"

    def finish(self) -> Sent:
        self._send_until(len(self.datasets))
        assoc = self.client.assoc
        failed = bool(self.failure) or not assoc.is_established
        self.stop()
        return Sent(list(self.acknowledged), failed, self.failure or "released")

    def stop(self) -> None:
        self.client.close()


def make_sender(client: str, lb_port: int, study: Study, tmp_path: Path) -> Sender:
    files = sorted(study.files)
    if client == "storescu":
        return StorescuSender(lb_port, files, tmp_path / "storescu.log")
    return PynetdicomSender(lb_port, files)


def resend(client: str, lb_port: int, study: Study, missing: set[str], tmp_path: Path) -> Sent:
    """What the modality does next: a new association with every instance not acknowledged."""
    files = sorted(path for path in study.files if peers.read_sop_uid(path) in missing)
    if client == "storescu":
        result = peers.dcmtk(
            "storescu", "-v", *STORESCU_TIMEOUTS, "-aet", "MODALITY", "-aec", "ANY-SCP",
            "127.0.0.1", str(lb_port), *map(str, files), timeout=60.0,
        )  # fmt: skip
        uid_of = {str(path): peers.read_sop_uid(path) for path in files}
        return Sent([uid_of[p] for p in storescu_acknowledged(result.output)], not result.ok, str(result))
    sender = PynetdicomSender(lb_port, files)
    sender.start(0)
    return sender.finish()


# ----------------------------------------------------------------------------------------- accounting


@dataclass
class Accounting:
    """The figures of one run (see the module docstring)."""

    fault: str
    mode: str
    client: str
    study: Study
    first: Sent
    stored: dict[str, set[str]]  # per node, after the fault, before anything was resent
    resent: Sent | None = None
    final: dict[str, set[str]] = field(default_factory=dict)

    @property
    def acknowledged(self) -> set[str]:
        return set(self.first.acknowledged)

    @property
    def stored_uids(self) -> set[str]:
        return set().union(*self.stored.values())

    @property
    def lost(self) -> set[str]:
        return self.acknowledged - self.stored_uids

    def line(self) -> str:
        resent = len(self.study.sop_uids - self.acknowledged)
        final = len(set().union(*self.final.values()))
        return (
            f"accounting fault={self.fault} mode={self.mode} client={self.client} study={len(self.study.sop_uids)} "
            f"association={'failed' if self.first.failed else 'completed'} acknowledged={len(self.acknowledged)} "
            f"stored={len(self.stored_uids)} lost={len(self.lost)} "
            f"stored_unacknowledged={len(self.stored_uids - self.acknowledged)} resent={resent} final={final} "
            f"nodes={ {name: len(uids) for name, uids in self.final.items() if uids} }"
        )


def settle(
    fault: str,
    mode: str,
    client: str,
    nodes: list[OrthancNode],
    study: Study,
    first: Sent,
    lb_port: int,
    tmp_path: Path,
    *,
    down: OrthancNode | None = None,
) -> Accounting:
    """Count what the nodes hold after the fault, check that no acknowledged instance is lost, let the
    client resend what was not acknowledged, and check that the whole study is stored.

    ``down``: a node killed by the fault. It stays down while the client resends (the modality does not
    wait for it); then it is started again, on its own storage, to count what it kept.
    """
    stored = stored_anywhere([node for node in nodes if node is not down], study)
    missing = study.sop_uids - set(first.acknowledged)
    resent = resend(client, lb_port, study, missing, tmp_path) if missing else None
    if down is not None:
        down.start()
        stored[down.name] = held(down, study)  # it received nothing after the kill
    account = Accounting(fault, mode, client, study, first, stored, resent, stored_anywhere(nodes, study))
    print(account.line())
    assert not account.lost, f"acknowledged but not stored: {sorted(account.lost)}; {account.line()}"
    if resent is not None:
        assert not resent.failed, f"the resend failed:\n{resent.detail}"
        assert set(resent.acknowledged) == missing, f"the resend was not acknowledged whole:\n{resent.detail}"
    assert set().union(*account.final.values()) == study.sop_uids, account.line()
    return account


# ------------------------------------------------------------------------------------------ the balancer


@dataclass
class Balancer:
    """A running pacslb with one service, ``dicom``, in ``mode``, its admin API and its state file."""

    process: PacslbProcess
    mode: str
    port: int
    admin: int
    state_file: Path

    @property
    def line_event(self) -> str:
        """The log line each connection ends with: ``conn`` in tcp mode, ``assoc`` in dicom mode."""
        return "conn" if self.mode == "tcp" else "assoc"

    @property
    def snapshot(self) -> Path:
        """The memory store's persistence snapshot, beside the state file (pacslb/state/store.py)."""
        return self.state_file.with_name(self.state_file.stem + ".persistence.json")


def balancer_config(
    mode: str, port: int, admin: int, state_file: Path, servers: dict[str, str | dict[str, Any]]
) -> str:
    spec = peers.service(
        port, servers, balance="roundrobin", persistence={"type": "source_ip", "timeout": "30m"}, check=CHECK, mode=mode
    )
    return peers.config_text(
        {"dicom": spec},
        admin=peers.admin_section(admin, state_file=str(state_file)),
        halt_grace=f"{HALT_GRACE:g}s",
        shutdown_grace="1s",
    )


def start_balancer(
    pacslb: PacslbFactory, mode: str, nodes: list[OrthancNode], tmp_path: Path
) -> tuple[Balancer, Callable[[dict[str, str | dict[str, Any]]], str]]:
    """pacslb in front of ``nodes``; also returns the function writing its config for other servers."""
    port, admin = peers.free_port(), peers.free_port()
    state_file = tmp_path / "state" / "admin-state.json"
    state_file.parent.mkdir(exist_ok=True)

    def config(servers: dict[str, str | dict[str, Any]]) -> str:
        return balancer_config(mode, port, admin, state_file, servers)

    process = pacslb(config({node.name: node.address for node in nodes}))
    return Balancer(process, mode, port, admin, state_file), config


def admin_action(lb: Balancer, node: OrthancNode, action: str) -> None:
    response = peers.admin_api(lb.admin, "POST", f"/api/v1/nodes/{node.name}/{action}")
    assert response.status_code == 200, response.text


def pinned(snapshot: Path) -> dict[str, str]:
    """The pins in the persistence snapshot on disk: client key -> server."""
    try:
        document = json.loads(snapshot.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {row[0]: row[1] for rows in document["services"].values() for row in rows}


def children(pid: int) -> list[int]:
    """PIDs of the child processes of ``pid`` (pacslb's relay workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (peers.md: PID 1 reaps orphans late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_orphans(pids: list[int]) -> list[int]:
    """Wait (bounded) for the relay workers of a killed pacslb to exit: each ends with its last
    connection. Those still running past the bound are killed (by PID) and returned."""
    deadline = time.monotonic() + WITHIN
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


# ------------------------------------------------------------------------------------------------ tests


def _sender(client: str, lb: Balancer, study: Study, tmp_path: Path) -> Sender:
    return make_sender(client, lb.port, study, tmp_path)


def from_client(client: str) -> Callable[[str], bool]:
    """A log criterion: the line is about an association of this client (by its source address)."""
    return peers.client_ip("127.0.0.1" if client == "storescu" else PYNETDICOM_SOURCE)


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("mode", MODES)
def test_node_killed_mid_association(
    nodes: list[OrthancNode], pacslb: PacslbFactory, tmp_path: Path, mode: str, client: str
) -> None:
    """(a) The node dies: the association is cut; what was acknowledged is on its disk; the modality
    resends the rest, which goes to the other node."""
    lb, _ = start_balancer(pacslb, mode, nodes[:2], tmp_path)
    study = peers.make_study(tmp_path / "study", STUDY_SIZE)
    sender = _sender(client, lb, study, tmp_path)
    try:
        sender.start(FAULT_AFTER)
        if isinstance(sender, StorescuSender):
            sender.in_flight()  # the node stores instance 5; it dies before its acknowledgment is through
        node = receiving_node(nodes, study)
        node.kill()
        if isinstance(sender, StorescuSender):
            sender.wait_cut()
        first = sender.finish()
    finally:
        sender.stop()

    account = settle("node_kill", mode, client, nodes, study, first, lb.port, tmp_path, down=node)
    assert first.failed and len(account.acknowledged) == FAULT_AFTER, first.detail
    assert len(account.stored_uids - account.acknowledged) == (client == "storescu"), account.line()
    other = next(n for n in nodes[:2] if n is not node)
    assert account.final[other.name] >= account.study.sop_uids - account.stored_uids, "the resend went elsewhere"


@pytest.mark.parametrize("mode", MODES)
def test_balancer_killed_and_restarted_mid_association(
    nodes: list[OrthancNode], pacslb: PacslbFactory, tmp_path: Path, mode: str
) -> None:
    """(b) pacslb is killed with SIGKILL while two modalities (storescu, pynetdicom) are in the middle
    of an association each, and started again with the same config: nothing acknowledged is lost, and
    each modality's resent part follows its first part to its node (the persistence snapshot beside the
    admin state file survives the kill)."""
    lb, _ = start_balancer(pacslb, mode, nodes[:2], tmp_path)
    studies = {client: peers.make_study(tmp_path / client / "study", STUDY_SIZE) for client in CLIENTS}
    senders = {client: _sender(client, lb, studies[client], tmp_path / client) for client in CLIENTS}
    workers: list[int] = []
    try:
        for sender in senders.values():
            sender.start(FAULT_AFTER)
            if isinstance(sender, StorescuSender):
                sender.in_flight()  # instance 5 stored; its acknowledgment dies with pacslb
        receivers = {client: receiving_node(nodes, studies[client]) for client in CLIENTS}
        peers.wait_for(lambda: len(pinned(lb.snapshot)) == len(CLIENTS), SNAPSHOT_WITHIN, "both pins on disk")
        assert set(pinned(lb.snapshot).values()) == {node.name for node in receivers.values()}
        workers = children(lb.process.pid)
        lb.process.send(signal.SIGKILL)
        lb.process.wait_exit(WITHIN)
        for sender in senders.values():
            if isinstance(sender, StorescuSender):
                sender.wait_cut()
        restarted = pacslb(lb.process.config_path.read_text())
        loaded = restarted.wait_event("persistence_loaded", WITHIN)
        assert loaded.get("entries") == str(len(CLIENTS)), loaded.line
        sent = {client: sender.finish() for client, sender in senders.items()}
    finally:
        for sender in senders.values():
            sender.stop()
        orphans = stop_orphans(workers)
    assert not orphans, f"relay workers of the killed pacslb outlived their connections: {orphans}"

    for client in CLIENTS:
        study, node = studies[client], receivers[client]
        account = settle("balancer_kill", mode, client, nodes, study, sent[client], lb.port, tmp_path / client)
        assert sent[client].failed and len(account.acknowledged) == FAULT_AFTER, sent[client].detail
        assert len(account.stored_uids - account.acknowledged) == (client == "storescu"), account.line()
        holders = {name for name, uids in account.final.items() if uids}
        assert holders == {node.name}, f"the study was split by the restart: {account.line()}"


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("mode", MODES)
def test_twenty_reloads_during_an_association(
    nodes: list[OrthancNode], pacslb: PacslbFactory, tmp_path: Path, mode: str, client: str
) -> None:
    """(c) 20 reloads (SIGHUP) while the association runs, one instance between each: alternately a
    weight changes and the node carrying the association leaves or rejoins the config. Nothing fails,
    and new associations are served after every reload."""
    lb, config = start_balancer(pacslb, mode, nodes, tmp_path)
    study = peers.make_study(tmp_path / "study", RELOAD_STUDY_SIZE)
    sender = _sender(client, lb, study, tmp_path)
    try:
        sender.start(1)
        node = receiving_node(nodes, study)
        other = next(n for n in nodes if n is not node)
        for i in range(1, RELOADS + 1):
            weight = 1 + (i + 1) // 2 % 3  # changes at odd i
            removed = i // 2 % 2 == 1  # changes at even i: out at 2, back at 4, out at 6, ...
            servers: dict[str, str | dict[str, Any]] = {
                n.name: {"address": n.address, "weight": weight if n in (node, other) else 1}
                for n in nodes
                if not (removed and n is node)
            }
            mark = lb.process.mark()
            lb.process.reload(config(servers))
            lb.process.wait_event("reloaded", WITHIN, since=mark)
            sender.step(1)
            probe = peers.attempt_association(lb.port, PROBE_SOURCE)
            assert probe.established and probe.echo_status == 0, f"after reload {i}: {probe}"
        first = sender.finish()
    finally:
        sender.stop()

    account = settle("reloads", mode, client, nodes, study, first, lb.port, tmp_path)
    assert not first.failed and account.acknowledged == study.sop_uids, first.detail
    assert account.final[node.name] == study.sop_uids, account.line()
    assert len(lb.process.events("reloaded")) == RELOADS
    assert not lb.process.events("reload_refused"), lb.process.log()
    line = lb.process.wait_event(lb.line_event, WITHIN, client=from_client(client))
    assert (line.get("server"), line.get("end")) == (node.name, "client_closed"), line.line


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("mode", MODES)
def test_node_drained_mid_association(
    nodes: list[OrthancNode], pacslb: PacslbFactory, tmp_path: Path, mode: str, client: str
) -> None:
    """(d) The node is drained: the association runs to its end (a drain never cuts), a new client
    goes elsewhere, and nothing is resent."""
    lb, _ = start_balancer(pacslb, mode, nodes[:2], tmp_path)
    study = peers.make_study(tmp_path / "study", STUDY_SIZE)
    sender = _sender(client, lb, study, tmp_path)
    try:
        sender.start(FAULT_AFTER)
        node = receiving_node(nodes, study)
        admin_action(lb, node, "drain")
        probe = peers.attempt_association(lb.port, PROBE_SOURCE)
        assert probe.established and probe.echo_status == 0, probe
        line = lb.process.wait_event(lb.line_event, WITHIN, client=probe.local_address)
        assert line.get("server") != node.name, f"a new client went to the drained node: {line.line}"
        first = sender.finish()
    finally:
        sender.stop()

    account = settle("drain", mode, client, nodes, study, first, lb.port, tmp_path)
    assert not first.failed and account.acknowledged == study.sop_uids, first.detail
    assert account.final[node.name] == study.sop_uids, account.line()
    line = lb.process.wait_event(lb.line_event, WITHIN, client=from_client(client))
    assert (line.get("server"), line.get("end")) == (node.name, "client_closed"), line.line


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("mode", MODES)
def test_node_halted_mid_association(
    nodes: list[OrthancNode], pacslb: PacslbFactory, tmp_path: Path, mode: str, client: str
) -> None:
    """(e) The node is halted: the association goes on for ``halt_grace``, then pacslb cuts it; the
    modality resends what was not acknowledged, and that goes to the other node."""
    lb, _ = start_balancer(pacslb, mode, nodes[:2], tmp_path)
    study = peers.make_study(tmp_path / "study", STUDY_SIZE)
    sender = _sender(client, lb, study, tmp_path)
    try:
        sender.start(FAULT_AFTER)
        node = receiving_node(nodes, study)
        mark = lb.process.mark()
        admin_action(lb, node, "halt")
        sender.step(1)  # within the grace, the association still works
        cut = lb.process.wait_event(lb.line_event, WITHIN + HALT_GRACE, since=mark, client=from_client(client))
        first = sender.finish()
    finally:
        sender.stop()

    assert (cut.get("server"), cut.get("end")) == (node.name, "halted"), cut.line
    account = settle("halt", mode, client, nodes, study, first, lb.port, tmp_path)
    assert first.failed, first.detail
    assert len(account.acknowledged) == FAULT_AFTER + 1, account.line()
    assert account.final[node.name] == account.stored[node.name], "the halted node took the resend"
