"""The pass through a running pacslb: mutated first PDUs and request heads over real sockets.

Theory of operation
-------------------
``python -m pacslb run`` (a child process, ``workers: 1``) serves two services: ``mode: dicom`` in front
of a DICOM node and ``mode: http`` in front of an HTTP node. Both nodes run in this process, on the same
event loop as the clients, and record what reaches them: the DICOM node the digest of every first PDU (it
answers an A-ASSOCIATE-RQ with an A-ASSOCIATE-AC, an A-RELEASE-RQ with an A-RELEASE-RP); the HTTP node,
by the last X-Forwarded-For address, how many heads and whole requests each client got through (it
answers every request 200 with an ``X-Fuzz-Node`` field, so its answers are told from pacslb's own).

Each input goes over its own connection from its own source address (127.a.b.c, one per input): that
is how the HTTP node's records are tied to the input, and it keeps the kernel's ephemeral ports out of
the way. Most clients close their sending side after the input (pacslb then knows nothing more is
coming); ``hold_share`` of them keep it open, so that pacslb's own timeouts (negotiation, request head)
are what ends the exchange. The answer is then read until pacslb closes.

What is checked, per input (the expectation is the parser's verdict, :mod:`fuzz.oracle`):
- a hang: pacslb neither answers and closes nor closes within its configured timeout plus ``MARGIN``;
- DICOM: a refused first PDU gets exactly the A-ASSOCIATE-RJ or A-ABORT the parser names (and it must be
  one PS3.8 allows), then the close; it never reaches the node; an accepted one reaches the node byte
  for byte and its A-ASSOCIATE-AC comes back; an incomplete one gets an A-ABORT after the negotiation
  timeout, or the close when the client closed;
- HTTP: pacslb's own answers are 400, 405, 408, 431, 501 or 505 and end the connection; a request that
  pacslb answered itself never reached the node whole, and no head the parser refuses reached it at all;
  every head that reached the node was read by the node's parser without error.
Between batches a well-behaved client (a valid association with release, a valid GET) must be served;
at the end pacslb must still run, and its log must hold no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import uvloop
import yaml

from fuzz import mutate, oracle

REPO = Path(__file__).resolve().parents[2]
NEGOTIATION = 1.0  # timeouts.negotiation of the dicom service
REQUEST_HEAD = 1.0  # http.timeouts.request_head, keep_alive and client of the http service
ARTIM = 1.0  # pacslb waits this long for the peer to close after a refusal (proxy/dicom.py)
#: Beyond pacslb's own timeouts, how long an answer may take on a loaded 2-core machine before it is a hang.
MARGIN = 5.0
HANG_AFTER = max(NEGOTIATION + ARTIM, REQUEST_HEAD) + MARGIN
A_RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])
A_RELEASE_RP = bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])
NODE_MARK = b"X-Fuzz-Node: 1"
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def source_address(index: int) -> str:
    """A distinct loopback address per input (16 million of them)."""
    return f"127.{index // 254**2 % 250 + 1}.{index // 254 % 254 + 1}.{index % 254 + 1}"


# ------------------------------------------------------------------------------------------------ nodes


def associate_ac(rq: bytes) -> bytes:
    """An A-ASSOCIATE-AC for ``rq`` (PS3.8 9.3.3): its fixed part, the application context, a max length."""
    item = lambda kind, value: struct.pack(">BBH", kind, 0, len(value)) + value  # noqa: E731
    body = rq[6:74] + item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x50, item(0x51, struct.pack(">I", 16384)))
    return struct.pack(">BBI", 0x02, 0, len(body)) + body


@dataclass
class Nodes:
    dicom_seen: set[str] = field(default_factory=set)
    http_heads: Counter[str] = field(default_factory=Counter)
    http_complete: Counter[str] = field(default_factory=Counter)
    http_head_errors: list[str] = field(default_factory=list)

    async def dicom(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = True
            while True:
                header = await reader.readexactly(6)
                length = struct.unpack(">I", header[2:6])[0]
                if length > 1 << 20:
                    break
                pdu = header + await reader.readexactly(length)
                if first:
                    self.dicom_seen.add(oracle.digest(pdu))
                    first = False
                    if pdu[0] != 0x01:
                        break
                    writer.write(associate_ac(pdu))
                elif pdu[0] == 0x05:
                    writer.write(A_RELEASE_RP)
                    await writer.drain()
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    def http_protocol(self) -> asyncio.Protocol:
        return _HttpNode(self)


class _HttpNode(asyncio.Protocol):
    """One node connection: httptools reads the requests, each is answered 200 with the node's mark."""

    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes
        self.parser = httptools.HttpRequestParser(self)
        self.client = "-"
        self.in_head = False
        self.head_only = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def on_message_begin(self) -> None:
        self.client = "-"
        self.in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-forwarded-for":
            self.client = value.rsplit(b",", 1)[-1].strip().decode("latin-1")

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_only = self.parser.get_method() == b"HEAD"
        self.nodes.http_heads[self.client] += 1

    def on_message_complete(self) -> None:
        self.nodes.http_complete[self.client] += 1
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\n" + NODE_MARK + b"\r\nContent-Length: 2\r\n\r\n")
        if not self.head_only:
            self.transport.write(b"ok")

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.parser = httptools.HttpRequestParser(self)  # answered 200, not 101: HTTP goes on
        except httptools.HttpParserError as exc:
            if self.in_head:
                self.nodes.http_head_errors.append(f"{self.client}: {exc}")
            assert self.transport is not None
            self.transport.close()


# ------------------------------------------------------------------------------------------------ pacslb


class Pacslb:
    """``python -m pacslb run`` with the two services, its log in the work directory."""

    def __init__(self, work: Path, dicom_node: int, http_node: int) -> None:
        self.work = work
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config = work / "pacslb.yaml"
        self.log = work / "pacslb.log"
        config = {
            "workers": 1,
            "shutdown_grace": "1s",
            "log": {"format": "text", "level": "warning"},  # a refusal is a warning; a traceback an error
            "services": {
                "dicom": {
                    "listen": f"127.0.0.1:{self.dicom_port}", "mode": "dicom", "persistence": {"type": "none"},
                    "check": {"type": "none"}, "timeouts": {"negotiation": f"{NEGOTIATION:g}s"}, "maxconn": 512,
                    "servers": {"node1": f"127.0.0.1:{dicom_node}"},
                },
                "web": {
                    "listen": f"127.0.0.1:{self.http_port}", "mode": "http", "persistence": {"type": "none"},
                    "check": {"type": "none"}, "maxconn": 512,
                    "http": {"timeouts": {t: f"{REQUEST_HEAD:g}s" for t in ("request_head", "keep_alive", "client")}},
                    "servers": {"web1": f"127.0.0.1:{http_node}"},
                },
            },
        }  # fmt: skip
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pacslb", "run", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.work,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        for port in (self.dicom_port, self.http_port):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"pacslb exited: {self.log.read_text(errors='replace')}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    break
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("pacslb did not listen within 20 s")
                time.sleep(0.05)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def tracebacks(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if "Traceback" in line or line.split(" ", 2)[1:2] == ["error"]]


# ----------------------------------------------------------------------------------------------- clients


@dataclass
class Answer:
    data: bytes
    closed: bool
    seconds: float


async def exchange(index: int, port: int, data: bytes, hold: bool, dicom: bool) -> Answer:
    """One input over its own connection; read until pacslb closes or :data:`HANG_AFTER` passes."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    sock = socket.socket()
    sock.setblocking(False)
    received = bytearray()
    closed = False
    try:
        sock.bind((source_address(index), 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        with contextlib.suppress(OSError):
            if data:
                await loop.sock_sendall(sock, data)
            if not hold:
                sock.shutdown(socket.SHUT_WR)
        released = False
        deadline = started + HANG_AFTER
        while (remaining := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    chunk = await loop.sock_recv(sock, 65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
            if dicom and hold and not released and received[:1] == b"\x02" and _whole_pdus(bytes(received)):
                released = True  # accepted: end it as a modality would
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(sock, A_RELEASE_RQ)
            if dicom and released and A_RELEASE_RP in received:
                closed = True  # the release is done; the client closes
                break
    finally:
        sock.close()
    return Answer(bytes(received), closed, loop.time() - started)


def _whole_pdus(data: bytes) -> list[bytes] | None:
    """``data`` split into PDUs, or None if the last one is incomplete."""
    pdus = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 6:
            return None
        end = pos + 6 + struct.unpack(">I", data[pos + 2 : pos + 6])[0]
        if end > len(data):
            return None
        pdus.append(data[pos:end])
        pos = end
    return pdus


# ------------------------------------------------------------------------------------------------ checks


@dataclass
class Figures:
    kind: str
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    hangs: int = 0
    violations: int = 0
    mismatches: int = 0  # the process answered differently from the parser, within what is allowed
    details: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)

    def problem(self, what: str, data: bytes, work: Path | None, detail: str) -> None:
        if what == "hang":
            self.hangs += 1
        else:
            self.violations += 1
        if len(self.details) < 30:
            self.details.append(f"{what}: {detail} input={data[:120]!r}")
        if work is not None:
            path = work / "crashes" / f"live-{self.kind}" / f"{what}-{oracle.digest(data)}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def check_dicom(figures: Figures, data: bytes, hold: bool, answer: Answer, work: Path | None) -> None:
    expected = oracle.dicom_verdict(data)
    if not answer.closed:
        figures.problem("hang", data, work, f"no close within {HANG_AFTER:g}s, got {answer.data[:40].hex()}")
        return
    pdus = _whole_pdus(answer.data)
    if pdus is None:
        figures.problem("violation", data, work, f"an incomplete PDU before the close: {answer.data[:40].hex()}")
        return
    for pdu in pdus:
        if pdu[0] in (0x03, 0x07):
            try:
                oracle.check_refusal_pdu(pdu)
            except oracle.Violation as exc:
                figures.problem("violation", data, work, str(exc))
                return
    got = (
        "accepted" if pdus and pdus[0][0] == 0x02 else
        "rejected" if pdus and pdus[0][0] == 0x03 else
        "aborted" if pdus and pdus[0][0] == 0x07 else
        "closed" if not pdus else f"pdu 0x{pdus[0][0]:02x}"
    )  # fmt: skip
    figures.outcomes[got] += 1
    if expected.outcome in ("rejected", "aborted"):
        if pdus != [expected.response]:
            figures.problem("violation", data, work, f"expected {expected.response.hex()}, got {answer.data.hex()}")
    elif expected.outcome == "accepted":
        if got != "accepted":
            figures.problem("violation", data, work, f"a valid A-ASSOCIATE-RQ got {answer.data[:40].hex()}")
    elif expected.outcome == "incomplete":
        allowed = ([[]] if not hold else []) + [[bytes([7, 0, 0, 0, 0, 4, 0, 0, 2, 0])]]
        if pdus not in allowed:
            figures.problem("violation", data, work, f"an incomplete RQ got {answer.data[:40].hex()}")


def split_responses(data: bytes) -> list[tuple[int, bool]]:
    """(status, from the node) of each response in what a client received."""
    starts = [m.start() for m in STATUS_LINE.finditer(data)]
    out = []
    for a, b in zip(starts, [*starts[1:], len(data)], strict=False):
        segment = data[a:b]
        out.append((int(segment[9:12]), NODE_MARK in segment))
    return out


@dataclass
class HttpRecord:
    ip: str
    data: bytes
    heads_ok: int
    own_refusal: bool
    node_answers: int


def check_http(
    figures: Figures, index: int, data: bytes, hold: bool, answer: Answer, records: list[HttpRecord], work: Path | None
) -> None:
    verdict = oracle.check_http(data)
    if not answer.closed:
        figures.problem("hang", data, work, f"no close within {HANG_AFTER:g}s, got {answer.data[:80]!r}")
        return
    # 100 Continue: pacslb's own interim answer to Expect: 100-continue (RFC 9110 10.1.1), not a final one
    responses = [(status, node) for status, node in split_responses(answer.data) if status != 100]
    own = [status for status, node in responses if not node]
    node_answers = len(responses) - len(own)
    for position, (status, node) in enumerate(responses):
        if not node and status not in oracle.OWN_STATUSES:
            figures.problem("violation", data, work, f"pacslb answered {status}: {answer.data[:200]!r}")
            return
        if not node and position != len(responses) - 1:
            figures.problem("violation", data, work, f"pacslb's {status} was not the last answer: {answer.data!r}")
            return
    figures.outcomes[f"own {own[-1]}" if own else ("forwarded" if node_answers else "closed")] += 1
    if verdict.status is not None:
        wanted = {verdict.status, 408} if hold else {verdict.status}
        # (a client that closed its side mid-message may just be closed: it is gone)
        if (own and own[-1] not in wanted | {400, 431}) or (not own and hold):
            figures.mismatches += 1
            if len(figures.differs) < 10:
                figures.differs.append(f"parser {verdict.status}, pacslb {own or 'closed'}: {data[:160]!r}")
    records.append(HttpRecord(source_address(index), data, verdict.heads, bool(own), node_answers))


def check_http_nodes(figures: Figures, nodes: Nodes, records: list[HttpRecord], work: Path | None) -> None:
    """After the run: what reached the node from each input (tied by its source address)."""
    for record in records:
        complete = nodes.http_complete.get(record.ip, 0)
        heads = nodes.http_heads.get(record.ip, 0)
        if record.own_refusal and complete > record.node_answers:
            figures.problem(
                "violation", record.data, work, f"the node got {complete} requests, answered {record.node_answers}"
            )
        if heads > record.heads_ok:
            figures.problem(
                "violation", record.data, work, f"the node saw {heads} heads, the parser accepts {record.heads_ok}"
            )
    for error in nodes.http_head_errors:
        figures.problem("violation", b"", work, f"the node could not read a forwarded head: {error}")


# -------------------------------------------------------------------------------------------------- probes


async def probe(pacslb: Pacslb, dicom_rq: bytes, index: int) -> list[str]:
    """A well-behaved client of each service: a valid association with release, a valid GET."""
    failures = []
    if not pacslb.running():
        return ["pacslb is not running"]
    answer = await exchange(index, pacslb.dicom_port, dicom_rq, True, True)
    if not (answer.data.startswith(b"\x02") and A_RELEASE_RP in answer.data):
        failures.append(f"dicom probe: {answer}")
    answer = await exchange(index + 1, pacslb.http_port, b"GET /probe HTTP/1.1\r\nHost: probe\r\n\r\n", False, False)
    if split_responses(answer.data) != [(200, True)]:
        failures.append(f"http probe: {answer}")
    return failures


# ------------------------------------------------------------------------------------------------ campaign


async def _run(
    counts: dict[str, int], seeds: dict[str, list[bytes]], seed: int, work: Path | None, concurrency: int,
    hold_share: float, batch: int, probe_rq: bytes, run_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    nodes = Nodes()
    dicom_server = await asyncio.start_server(nodes.dicom, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    http_server = await loop.create_server(nodes.http_protocol, "127.0.0.1", 0)
    pacslb = Pacslb(run_dir, dicom_server.sockets[0].getsockname()[1], http_server.sockets[0].getsockname()[1])
    await asyncio.to_thread(pacslb.start)
    figures = {kind: Figures(kind) for kind in counts}
    records: list[HttpRecord] = []
    probes = {"ok": 0, "failed": 0, "details": []}
    started = time.monotonic()
    next_index = 10
    try:
        for kind, count in counts.items():
            if not count:
                continue
            rng_hold = mutate.random.Random(f"hold:{kind}:{seed}")
            next_input = mutate.stream(kind, seeds[kind], seed)
            port = pacslb.dicom_port if kind == "dicom" else pacslb.http_port
            done = 0
            while done < count:
                size = min(batch, count - done)
                items = [(next_index + i, next_input(), rng_hold.random() < hold_share) for i in range(size)]
                next_index += size + 2
                queue = iter(items)

                async def worker(kind: str = kind, port: int = port, queue: Any = queue) -> None:
                    for index, data, hold in queue:
                        answer = await exchange(index, port, data, hold, kind == "dicom")
                        fig = figures[kind]
                        fig.inputs += 1
                        if kind == "dicom":
                            check_dicom(fig, data, hold, answer, work)
                        else:
                            check_http(fig, index, data, hold, answer, records, work)

                await asyncio.gather(*(worker() for _ in range(concurrency)))
                done += size
                failures = await probe(pacslb, probe_rq, next_index - 2)
                probes["ok" if not failures else "failed"] += 1  # type: ignore[operator]
                probes["details"].extend(failures)  # type: ignore[attr-defined]
                if not pacslb.running():
                    break
            if not pacslb.running():
                break
        await asyncio.sleep(1.0)  # anything pacslb still forwards reaches the nodes
        if "http" in figures:
            check_http_nodes(figures["http"], nodes, records, work)
        if "dicom" in figures:
            pass  # refusals reaching the node are checked below, with the digests the node recorded
    finally:
        alive = pacslb.running()
        code = await asyncio.to_thread(pacslb.stop)
        dicom_server.close()
        http_server.close()
    return {
        "figures": figures,
        "probes": probes,
        "pacslb_alive_at_end": alive,
        "pacslb_exit_code": code,
        "tracebacks": pacslb.tracebacks(),
        "seconds": round(time.monotonic() - started, 1),
        "dicom_node_seen": nodes.dicom_seen,
    }


def run(
    counts: dict[str, int],
    seeds: dict[str, list[bytes]],
    seed: int,
    work: Path | None,
    run_dir: Path,
    concurrency: int = 32,
    hold_share: float = 0.02,
    batch: int = 2000,
) -> dict[str, Any]:
    """The pass; returns its figures. ``work`` (None: nothing saved) holds the inputs that failed."""
    probe_rq = next(s for s in seeds["dicom"] if oracle.dicom_verdict(s).outcome == "accepted")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(_run(counts, seeds, seed, work, concurrency, hold_share, batch, probe_rq, run_dir))
    # A refused first PDU must never reach the node: replay the inputs' verdicts against its digests.
    seen = result.pop("dicom_node_seen")
    if counts.get("dicom"):
        next_input = mutate.stream("dicom", seeds["dicom"], seed)
        fig = result["figures"]["dicom"]
        for _ in range(fig.inputs):
            data = next_input()
            verdict = oracle.dicom_verdict(data)
            total = 6 + int.from_bytes(data[2:6], "big") if len(data) >= 6 else 0
            if verdict.outcome != "accepted" and total and oracle.digest(data[:total]) in seen:
                fig.problem("violation", data, work, "a refused first PDU reached the node")
    return result
