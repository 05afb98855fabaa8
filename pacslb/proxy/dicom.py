"""A virtual service in dicom mode: read the A-ASSOCIATE-RQ, decide with it, retry it, then relay.

Theory of operation (PS3.8 section 9 for the PDUs, reference/dicom-ul.md for the byte layout):
1. The client's first PDU is read within ``timeouts.negotiation`` and parsed (protocols/dicom.py). A
   malformed, oversized or wrong first PDU gets an A-ABORT (or the A-ASSOCIATE-RJ PS3.8 prescribes);
   silence gets an A-ABORT; both are logged, and nothing else is affected.
2. The edge decides: maxconn reached -> A-ASSOCIATE-RJ (2, 3, 2); calling or called AE title not allowed
   -> (1, 1, 3) / (1, 1, 7); a per-client limit (``limits``: connections or rate of the client, decided at
   accept in tcp.py; associations of the calling AE title, AE titles of the client, decided here) ->
   (2, 3, 2), logged rate-limited as ``client_limited``. Routing rules narrow the servers; persistence
   may key on the calling AE.
3. The RQ is held and offered to one node after another: a failed connect, a transient A-ASSOCIATE-RJ, an
   A-ABORT, a close, or silence past ``timeouts.node_answer`` (3 s: a hung node costs seconds, not the
   modality's own timeout) all move it to the next node (at most ``retries`` more), and a node that did not
   answer is checked at once. A permanent rejection from a node goes to the client unchanged. When no node
   is left, the client gets the most informative transient rejection a node gave (``most_informative``),
   or else (2, 3, 1): both a modality retries later, rather than a TCP reset, after which it gives up.
4. Once a node sent its A-ASSOCIATE-AC, the AC goes to the client and the rest of the association flows
   through the same relay as tcp mode: no Python work per PDU.
One ``assoc`` log line per association, and per calling AE counters.

TLS (``dicom.tls`` on the listener, ``dicom.node_tls`` toward the nodes; pacslb/proxy/dicomtls.py): the
handshake comes first, within ``timeouts.negotiation``; a client whose certificate does not carry a name
``ae_identities`` binds to its calling AE title gets (1, 1, 3). Such an association's sides are transports,
read the same way, then relayed by the buffered relay in this process (TLS cannot be spliced).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pacslb.balance.claim import Claim
from pacslb.balance.decision import Attempts, choose
from pacslb.balance.dicom_policy import (
    AT_LIMIT,
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    NO_NODE,
    check_access,
    identity_allows,
    most_informative,
    persistence_key,
    route,
)
from pacslb.balance.limits import Limit, client_key
from pacslb.balance.persistence import PersistenceTable
from pacslb.balance.server import ServerState
from pacslb.checks.base import TlsTarget
from pacslb.config.model import ServiceSpec
from pacslb.errors import ConnectFailed
from pacslb.logs import log_event
from pacslb.protocols.dicom import (
    MAX_ASSOCIATE_AC_LENGTH,
    AssociateRQ,
    DicomProtocolError,
    PDUType,
    Rejection,
    build_abort,
    build_associate_rj,
    parse_associate_rj,
    parse_associate_rq,
    pdu_length,
)
from pacslb.protocols.proxy import proxy_header
from pacslb.proxy.dicomtls import StreamConn, identities, listener_context, node_context
from pacslb.proxy.outcome import End
from pacslb.proxy.relay import RelayCancelled, RelayResult, relay_transports
from pacslb.proxy.service import Service, TaskCut, addr_text, connect_to

log = logging.getLogger("pacslb.dicom")

#: Beyond maxconn, this many more clients are accepted only to be told A-ASSOCIATE-RJ (2, 3, 2); past
#: that the listener pauses as in tcp mode, so a flood cannot hold unbounded sockets.
AT_LIMIT_SLOTS = 64
#: After sending an A-ASSOCIATE-RJ or A-ABORT, how long to wait for the peer to close (PS3.8's ARTIM
#: timer): closing at once could reset the connection before the peer has read the PDU.
ARTIM = 1.0
#: Bound on the per calling AE counters; the least recently seen AE title goes first.
MAX_AE_STATS = 10_000
#: dicom.destination called_ae: the pause before a modality that could not be reached is tried again.
OUTBOUND_RETRY_PAUSE = 0.5
READ_SIZE = 65536


@dataclass(slots=True)
class AEStats:
    """Counters of one calling AE title, for metrics and the dashboard."""

    associations: int = 0
    rejected: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_seen: float = 0.0  # wall-clock time


class _Closed(Exception):
    """The peer closed before sending a whole PDU."""


class _Sock:
    """A plain side of an association as its socket: read and written directly, spliced once relayed."""

    __slots__ = ("loop", "sock")

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop

    async def recv(self) -> bytes:
        return await self.loop.sock_recv(self.sock, READ_SIZE)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()

    abort = close


#: One side of an association: a plain socket, or a transport (TLS, or plain facing a TLS side).
_Conn = _Sock | StreamConn


def _tls_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, in a few words: "wrong version number", "certificate verify failed"."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"  # revoked, expired, unknown CA, ...
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).replace("_", " ").lower()
    if isinstance(exc, TimeoutError):
        return "no handshake in time"
    return str(exc) or type(exc).__name__


async def _read_pdu(conn: _Conn, buffer: bytearray, deadline: float, limit: int) -> tuple[bytes, bytearray]:
    """Read one whole PDU (returns it and what followed it). Raises TimeoutError, _Closed, OSError, or
    DicomProtocolError for a PDU longer than ``limit``."""
    loop = asyncio.get_running_loop()
    while True:
        total = pdu_length(buffer)
        if total is not None:
            if total - 6 > limit:
                raise DicomProtocolError(f"PDU of {total} bytes exceeds {limit}", build_abort())
            if len(buffer) >= total:
                return bytes(buffer[:total]), buffer[total:]
        await _receive(conn, buffer, deadline, loop)


async def _receive(conn: _Conn, buffer: bytearray, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
    """Add what ``conn`` sends next to ``buffer``. Raises TimeoutError past ``deadline``, _Closed at its end."""
    remaining = deadline - loop.time()
    if remaining <= 0:
        raise TimeoutError
    async with asyncio.timeout(remaining):
        data = await conn.recv()
    if not data:
        raise _Closed
    buffer += data


async def _send_and_close(conn: _Conn, pdu: bytes) -> None:
    """Send a final PDU, then close the way PS3.8 9.1.6 expects: let the peer close first (bounded)."""
    try:
        async with asyncio.timeout(ARTIM):
            await conn.send(pdu)
        if isinstance(conn, _Sock):
            conn.sock.shutdown(socket.SHUT_WR)  # (TLS has no half-close: its close_notify comes with the close)
        async with asyncio.timeout(ARTIM):
            while await conn.recv():
                pass
    except (OSError, TimeoutError):
        pass
    finally:
        conn.close()


class DicomService(Service):
    """One dicom-mode virtual service."""

    ae_stats: OrderedDict[str, AEStats]
    tls: ssl.SSLContext | None  # the listener's (dicom.tls)
    node_tls: TlsTarget | None  # toward the nodes, and for their checks (dicom.node_tls)

    def __init__(
        self, name: str, spec: ServiceSpec, servers: list[ServerState], table: PersistenceTable | None
    ) -> None:
        super().__init__(name, spec, servers, table)
        self.ae_stats = OrderedDict()
        self.tls = self.node_tls = None
        self._tls_contexts(self.spec)

    def apply(self, spec: ServiceSpec, servers: list[ServerState], table: PersistenceTable | None) -> None:
        super().apply(spec, servers, table)
        self._tls_contexts(spec)

    def _tls_contexts(self, spec: ServiceSpec) -> None:
        """Make the TLS contexts the spec asks for, at start and at each reload: certificates renewed in
        place are read again (the nodes' checks restart with a new node context)."""
        dicom = spec.dicom
        tls = dicom.tls if dicom is not None else None
        node_tls = dicom.node_tls if dicom is not None else None
        self.tls = listener_context(tls) if tls is not None else None
        self.node_tls = TlsTarget(node_context(node_tls), node_tls.server_name) if node_tls is not None else None

    @property
    def accept_limit(self) -> int:
        return self.spec.maxconn + AT_LIMIT_SLOTS

    def _ae(self, calling: str) -> AEStats:
        stats = self.ae_stats.get(calling)
        if stats is None:
            stats = self.ae_stats[calling] = AEStats()
            if len(self.ae_stats) > MAX_AE_STATS:
                self.ae_stats.popitem(last=False)
        else:
            self.ae_stats.move_to_end(calling)
        stats.last_seen = time.time()
        return stats

    def _start(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self._spawn(self._handle(sock, peer))  # a task per connection: it reads from the client first

    limit_word = "A-ASSOCIATE-RJ"

    def limit_answer(self) -> tuple[bytes, bool] | None:
        # Local limit exceeded, transient (PS3.8 9.3.4): the modality retries later, as it does on maxconn.
        return _rj(AT_LIMIT), True

    async def _handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        loop = self._loop
        started = loop.time()
        spec = self.spec
        over_limit = self.active > spec.maxconn
        record = _Record(self, peer, started)
        client: _Conn | None = None
        try:
            record.local = sock.getsockname()
            if self.tls is None:
                client = _Sock(sock, loop)
            else:
                try:
                    client = await StreamConn.accept(sock, self.tls, spec.timeouts.negotiation)
                except (OSError, ssl.SSLError, TimeoutError) as exc:
                    record.done("aborted", f"TLS handshake failed: {_tls_failure(exc)}", "balancer")
                    return
                record.tls = client.version()
                record.identity = identities(client.certificate())
            buffer = bytearray()
            deadline = started + spec.timeouts.negotiation
            try:
                while (rq := parse_associate_rq(buffer)) is None:
                    await _receive(client, buffer, deadline, loop)
            except DicomProtocolError as exc:
                await _send_and_close(client, exc.response)
                record.calling, record.called = exc.calling_ae or "-", exc.called_ae or "-"
                if exc.response[0] == PDUType.A_ASSOCIATE_RJ:
                    record.done("rejected", str(parse_associate_rj(exc.response)), "balancer", error=str(exc))
                else:
                    record.done("aborted", str(exc), "balancer")
                return
            except TimeoutError:
                await _send_and_close(client, build_abort())
                record.done("aborted", f"no A-ASSOCIATE-RQ within {spec.timeouts.negotiation:g}s", "balancer")
                return
            except (_Closed, OSError):
                client.close()
                record.done("closed", "client closed before its A-ASSOCIATE-RQ", "client")
                return
            early = buffer[len(rq.raw) :]  # a client should wait for the AC; pass on whatever it sent anyway
            record.calling, record.called = rq.calling_ae, rq.called_ae
            stats = self._ae(rq.calling_ae)
            stats.associations += 1
            # An AE title that is not allowed gets the permanent answer even when the service is full.
            rejection = check_access(spec.dicom, rq.calling_ae, rq.called_ae, peer[0])
            detail = ""
            bound = spec.dicom.tls.ae_identities if spec.dicom is not None and spec.dicom.tls is not None else None
            if rejection is None and bound is not None and not identity_allows(bound, rq.calling_ae, record.identity):
                rejection = CALLING_AE_NOT_RECOGNIZED
                names = ", ".join(record.identity) or "none"
                detail = f": the client certificate's names ({names}) are not bound to {rq.calling_ae}"
            if rejection is None and over_limit:
                rejection = AT_LIMIT
            if rejection is not None:
                stats.rejected += 1
                await _send_and_close(client, _rj(rejection))
                record.done("rejected", str(rejection) + detail, "balancer")
                return
            key = client_key(peer[0], spec.limits)
            limit = self.limits.admit_association(key, rq.calling_ae, loop.time())
            if limit is not None:
                # Counted and logged rate-limited (client_limited), not as an assoc line each: a client
                # looping on a limit must not flood the log.
                stats.rejected += 1
                self.rejections["limit_" + limit.value] += 1
                self.refused(rq.calling_ae if limit is Limit.CALLING_AE_MAXCONN else key, limit)
                await _send_and_close(client, _rj(AT_LIMIT))
                return
            try:
                await self._associate(client, peer, rq, bytes(early), stats, record)
            finally:
                self.limits.release_association(key, rq.calling_ae, loop.time())
        except BaseException:
            if client is not None:
                client.abort()
            else:
                sock.close()
            raise

    async def _associate(
        self,
        client: _Conn,
        peer: tuple[str, int],
        rq: AssociateRQ,
        early: bytes,
        stats: AEStats,
        record: _Record,
    ) -> None:
        loop = self._loop
        spec = self.spec
        outbound = spec.dicom is not None and spec.dicom.destination == "called_ae"
        if outbound:
            # Towards a modality: the server named by the called AE title, tried again (after a pause)
            # until the association's negotiation time is up, as a modality may be restarting.
            servers = [s for s in self.servers if s.name == rq.called_ae]
            if not servers:
                stats.rejected += 1
                await _send_and_close(client, _rj(CALLED_AE_NOT_RECOGNIZED))
                record.done("rejected", f"{CALLED_AE_NOT_RECOGNIZED}: no destination {rq.called_ae}", "balancer")
                return
        else:
            names = route(spec.dicom, rq.calling_ae, rq.called_ae, peer[0])
            servers = self.servers if names is None else [s for s in self.servers if s.name in names]
        table = self.table
        key = (
            persistence_key(
                spec.persistence.type,
                rq.calling_ae,
                peer[0],
                spec.persistence.netmask,
                spec.persistence.netmask6,
            )
            if table is not None
            else None
        )
        attempts = Attempts(lambda tried: choose(servers, self.scheduler, table, key, loop.time(), tried), spec.retries)
        tried = record.tried = attempts.tried
        refusals: list[tuple[ServerState, Rejection, bytes]] = []  # the nodes' transient rejections
        header = proxy_header(peer, record.local) if spec.proxy_protocol == "v2" else b""
        while True:
            decision = attempts.next()
            if outbound and tried and not refusals:
                if loop.time() + OUTBOUND_RETRY_PAUSE < record.started + spec.timeouts.negotiation:
                    await asyncio.sleep(OUTBOUND_RETRY_PAUSE)
                    attempts.again()
                    continue
                decision = None
            if decision is None:
                stats.rejected += 1
                if not refusals:
                    await _send_and_close(client, _rj(NO_NODE))
                    record.done("rejected", str(NO_NODE), "balancer")
                    return
                # No node accepted, and some refused for now: their own reason tells the modality more.
                best = most_informative([rejection for _, rejection, _ in refusals])
                record.server, rejection, pdu = refusals[best]
                await _send_and_close(client, pdu)
                record.done("rejected", f"{rejection}, the most informative of {len(refusals)}", "node")
                return
            server = decision.server
            record.rule = decision.rule
            claim = self.claims.take(server)
            try:
                node = await self._connect(server, client, header)
            except ConnectFailed as exc:
                claim.release(loop.time())
                self.connect_failed(peer, server, exc.reason, attempts.failed())
                continue
            except BaseException:  # cancelled while connecting (the shutdown)
                claim.release(loop.time())
                raise
            try:
                answer, rest = await self._offer(node, rq)
            except BaseException:
                claim.release(loop.time())
                node.abort()
                raise
            if isinstance(answer, str) or answer[0] != PDUType.A_ASSOCIATE_AC:
                node.abort()
                claim.release(loop.time())
                if not isinstance(answer, str) and answer[0] == PDUType.A_ASSOCIATE_RJ:
                    rejection = parse_associate_rj(answer)
                    if not rejection.transient:
                        # The node's own verdict (unknown AE, ...): the client gets it as the node sent it.
                        stats.rejected += 1
                        record.server = server
                        await _send_and_close(client, answer)
                        record.done("rejected", str(rejection), "node")
                        return
                    reason = f"transient rejection {rejection}"
                    refusals.append((server, rejection, answer))
                else:
                    reason = answer if isinstance(answer, str) else "A-ABORT before answering"
                    if self.on_connect_failed is not None:
                        self.on_connect_failed(self.name, server)  # the node may be failing: check it now
                log_event(
                    log, "assoc_retry", logging.WARNING,
                    service=self.name, client=addr_text(peer), calling=rq.calling_ae, called=rq.called_ae,
                    server=server.name, reason=reason, attempt=attempts.failed(),
                )  # fmt: skip
                continue
            break
        record.server = server
        try:
            await self._relay_association(client, node, claim, key, rq, early, answer, rest, stats, record)
        finally:
            claim.release(loop.time())  # (released already, unless the association ended before its relay)

    async def _relay_association(
        self,
        client: _Conn,
        node: _Conn,
        claim: Claim,
        key: str | None,
        rq: AssociateRQ,
        early: bytes,
        answer: bytes,
        rest: bytes,
        stats: AEStats,
        record: _Record,
    ) -> None:
        """The node accepted: the client gets its A-ASSOCIATE-AC, and the association is relayed."""
        spec = self.spec
        try:
            await client.send(answer + rest)
            if early:
                await node.send(early)
            if isinstance(client, _Sock) and isinstance(node, StreamConn):  # a TLS node: relayed as transports
                client = await StreamConn.accept(client.sock, None, spec.timeouts.connect)
        except (OSError, TimeoutError):
            node.abort()
            client.abort()
            record.done("closed", "client went away before the A-ASSOCIATE-AC", "client")
            return
        record.accepted = True
        try:
            if isinstance(client, _Sock) and isinstance(node, _Sock):
                up, down, end = await self.relay(client.sock, node.sock, claim, key)
            else:
                assert isinstance(client, StreamConn) and isinstance(node, StreamConn)
                sides = (client, node)
                up, down, end = await self.relay_with(
                    lambda idle, ending: relay_transports(*sides, idle_timeout=idle, timeout_end=ending), claim, key
                )
        except asyncio.CancelledError as exc:  # a halt or the shutdown
            if isinstance(exc, RelayCancelled):
                self._count(stats, record, rq, early, answer, rest, exc.result.bytes_up, exc.result.bytes_down)
            record.end = self.cancelled_end()
            record.done("accepted", "", "")
            raise
        self._count(stats, record, rq, early, answer, rest, up, down)
        record.end = end
        record.done("accepted", "", "")

    async def relay(
        self, client: socket.socket, server_sock: socket.socket, claim: Claim, key: str | None
    ) -> tuple[int, int, End]:
        """Relay a connection whose server was chosen (``claim``) and connected, binding the claim (the
        persistence entry of ``key``, the node's counters, a halt's cut) and releasing it at the end.
        Returns bytes up, bytes down, the end."""
        return await self.relay_with(
            lambda idle, end: self.relayer(client, server_sock, idle_timeout=idle, timeout_end=end), claim, key
        )

    async def relay_with(
        self, run: Callable[[float, End], Awaitable[RelayResult]], claim: Claim, key: str | None
    ) -> tuple[int, int, End]:
        """:meth:`relay`, with the relay that ``run(idle_timeout, timeout_end)`` runs (mode dicom's TLS
        associations: the buffered relay over their transports)."""
        loop = self._loop
        task = asyncio.current_task()
        claim.bind(self.table, key, loop.time(), TaskCut(task, self.halting) if task is not None else None)
        timeouts = self.spec.timeouts
        idle = min(timeouts.client_idle, timeouts.server_idle)
        timeout_end = End.CLIENT_TIMEOUT if timeouts.client_idle <= timeouts.server_idle else End.SERVER_TIMEOUT
        up = down = 0
        end = End.ERROR
        try:
            result = await run(idle, timeout_end)
            up, down, end = result.bytes_up, result.bytes_down, result.end
        except RelayCancelled as exc:  # a halt or the shutdown: what was moved still counts
            up, down = exc.result.bytes_up, exc.result.bytes_down
            raise
        except Exception:
            log.exception("relay failed on service %s", self.name)
        finally:
            claim.release(loop.time(), up, down)
        return up, down, end

    @staticmethod
    def _count(
        stats: AEStats, record: _Record, rq: AssociateRQ, early: bytes, answer: bytes, rest: bytes, up: int, down: int
    ) -> None:
        """The bytes of an association: the negotiation's and what the relay moved after it."""
        up += len(rq.raw) + len(early)
        down += len(answer) + len(rest)
        stats.bytes_up += up
        stats.bytes_down += down
        record.up, record.down = up, down

    async def _connect(self, server: ServerState, client: _Conn, header: bytes) -> _Conn:
        """A connection to ``server``: its socket, or a transport when the node speaks TLS (handshake done,
        its certificate checked) or the client does; ``header`` (the PROXY protocol's) sent first. Raises
        ConnectFailed."""
        timeout = self.spec.timeouts.connect
        sock = await connect_to(server, timeout, self.spec.source)
        if header:
            try:
                async with asyncio.timeout(timeout):
                    await self._loop.sock_sendall(sock, header)
            except (OSError, TimeoutError) as exc:
                sock.close()
                raise ConnectFailed(server.name, f"PROXY header not sent: {exc}") from exc
        node_tls = self.node_tls
        if node_tls is None and isinstance(client, _Sock):
            return _Sock(sock, self._loop)
        context, name = (node_tls.context, node_tls.server_name) if node_tls is not None else (None, None)
        try:
            return await StreamConn.connect(sock, context, name, timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise ConnectFailed(server.name, f"TLS handshake failed: {_tls_failure(exc)}") from exc

    async def _offer(self, conn: _Conn, rq: AssociateRQ) -> tuple[bytes | str, bytes]:
        """Send the RQ to a node and read its answer PDU. A str answer says why there is none."""
        loop = self._loop
        timeout = self.spec.timeouts.node_answer
        try:
            async with asyncio.timeout(timeout):
                await conn.send(rq.raw)
            pdu, rest = await _read_pdu(conn, bytearray(), loop.time() + timeout, MAX_ASSOCIATE_AC_LENGTH)
        except TimeoutError:
            return f"no answer within {timeout:g}s", b""
        except _Closed:
            return "closed before answering", b""
        except DicomProtocolError as exc:
            return f"bad answer: {exc}", b""
        except OSError as exc:
            return f"connection failed: {exc.strerror or exc}", b""
        if pdu[0] == PDUType.A_ASSOCIATE_RJ and len(pdu) != 10:
            return "malformed A-ASSOCIATE-RJ", b""
        if pdu[0] not in (PDUType.A_ASSOCIATE_AC, PDUType.A_ASSOCIATE_RJ, PDUType.A_ABORT):
            return f"unexpected PDU type 0x{pdu[0]:02X} in answer", b""
        return pdu, bytes(rest)


def _rj(rejection: Rejection) -> bytes:
    return build_associate_rj(rejection.result, rejection.source, rejection.reason)


class _Record:
    """What the ``assoc`` log line of one association will say."""

    __slots__ = (
        "accepted",
        "called",
        "calling",
        "down",
        "end",
        "identity",
        "local",
        "peer",
        "rule",
        "server",
        "service",
        "started",
        "tls",
        "tried",
        "up",
    )

    def __init__(self, service: DicomService, peer: tuple[str, int], started: float) -> None:
        self.service = service
        self.peer = peer
        self.started = started
        self.calling = "-"
        self.called = "-"
        self.server: ServerState | None = None
        self.rule = "-"
        self.tried: list[ServerState] = []
        self.accepted = False
        self.up = self.down = 0
        self.end: End | None = None
        self.tls = ""  # TLS version and cipher of the client's side; "" when plain
        self.identity: tuple[str, ...] = ()  # the names of the client's certificate
        self.local: tuple[str, int] = ("", 0)  # the address the client connected to

    def done(self, outcome: str, detail: str, by: str, error: str = "") -> None:
        server = self.server
        end = self.end
        if end is None:
            end = {"closed": End.CLIENT_CLOSED, "rejected": End.REJECTED}.get(outcome, End.ABORTED)
        fields: dict[str, object] = {
            "service": self.service.name,
            "client": addr_text(self.peer),
            "calling": self.calling,
            "called": self.called,
            "server": server.name if server is not None else "-",
            "rule": self.rule,
            "outcome": outcome,
        }
        if detail:
            fields["detail"] = detail
        if by:
            fields["by"] = by
        if error:
            fields["error"] = error
        if self.tls:
            fields["tls"] = self.tls
            fields["identity"] = ",".join(self.identity) or "-"
        fields.update(
            retries=len(self.tried),
            duration=self.service._loop.time() - self.started,
            bytes_up=self.up,
            bytes_down=self.down,
            end=end.value,
        )
        level = logging.INFO if outcome == "accepted" else logging.WARNING
        if outcome in ("rejected", "aborted"):
            self.service.rejections[f"{outcome}_by_{by}" if by else outcome] += 1
        log_event(log, "assoc", level, **fields)
