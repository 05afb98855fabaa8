"""What an answer must be, by the standard: the checks of both passes.

A :class:`Violation` is an answer the standard does not allow (or a parse that depends on how the bytes
were split into reads, or a forwarded head another parser reads differently). Any other exception out of
the parsers is a crash: they may only return a result, None, or raise their protocol error.

DICOM (PS3.8 9.3.4, 9.3.8, tables 9-21 and 9-26): a refused first PDU is answered with exactly one
10-byte A-ASSOCIATE-RJ whose (result, source, reason) is a combination table 9-21 defines, or one A-ABORT
from the service provider (source 2) with a reason table 9-26 defines. An accepted A-ASSOCIATE-RQ is
forwarded byte for byte and has what PS3.8 requires (protocol version bit 0, AE titles of 1 to 16
characters of the default repertoire, the DICOM application context, at least one presentation context
with an odd ID, an abstract syntax and a transfer syntax).

HTTP (RFC 9112): a refused request head gets 400, 431, 501 or 505 (the balancer's own statuses for a
client's fault), never reaches a node, and the connection is closed after it; a head that is accepted is
forwarded as a head that pacslb's parser and h11 (an independent implementation) read the same way.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from typing import Any

import h11

from pacslb.protocols import dicom as ul
from pacslb.protocols import http1

CLIENT_ERROR_STATUSES = frozenset({400, 408, 431, 501, 505})
#: The balancer's own answers to requests it serves but does not forward (not a client error).
OWN_STATUSES = CLIENT_ERROR_STATUSES | {405}  # 405: CONNECT is not served

RJ_COMBINATIONS = frozenset(
    (result, source, reason)
    for result in (1, 2)
    for source, reasons in ((1, (1, 2, 3, 7)), (2, (1, 2)), (3, (1, 2)))
    for reason in reasons
)
ABORT_REASONS = frozenset({0, 1, 2, 4, 5, 6})
#: Inputs up to this size are also fed one byte per read (slow, so only the small ones).
BYTEWISE_UP_TO = 1024
TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class Violation(AssertionError):
    """An answer or a parse the standard does not allow."""


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# ------------------------------------------------------------------------------------------------ DICOM


def check_refusal_pdu(pdu: bytes) -> str:
    """``pdu`` must be a well-formed A-ASSOCIATE-RJ or provider A-ABORT; returns "rejected" or "aborted"."""
    if len(pdu) != 10 or pdu[1] != 0 or pdu[2:6] != b"\0\0\0\x04" or pdu[6] != 0:
        raise Violation(f"refusal PDU is not 10 bytes with length 4: {pdu.hex()}")
    if pdu[0] == ul.PDUType.A_ASSOCIATE_RJ:
        if (pdu[7], pdu[8], pdu[9]) not in RJ_COMBINATIONS:
            raise Violation(f"A-ASSOCIATE-RJ with a combination PS3.8 table 9-21 does not define: {pdu.hex()}")
        return "rejected"
    if pdu[0] == ul.PDUType.A_ABORT:
        if pdu[7] != 0 or pdu[8] != ul.AbortSource.SERVICE_PROVIDER or pdu[9] not in ABORT_REASONS:
            raise Violation(f"A-ABORT with a source or reason PS3.8 table 9-26 does not define: {pdu.hex()}")
        return "aborted"
    raise Violation(f"refusal is neither A-ASSOCIATE-RJ nor A-ABORT: {pdu.hex()}")


def _check_accepted(rq: ul.AssociateRQ, data: bytes) -> None:
    total = 6 + int.from_bytes(data[2:6], "big")
    if rq.raw != data[:total]:
        raise Violation("accepted A-ASSOCIATE-RQ is not forwarded byte for byte")
    if not rq.protocol_version & 1:
        raise Violation("accepted a protocol version without bit 0")
    for title in (rq.called_ae, rq.calling_ae):
        if not 1 <= len(title) <= 16 or any(c < " " or c > "~" or c == "\\" for c in title):
            raise Violation(f"accepted AE title {title!r} outside the default repertoire (PS3.5 6.2)")
    if rq.application_context != ul.DICOM_APPLICATION_CONTEXT:
        raise Violation(f"accepted application context {rq.application_context!r}")
    if not rq.presentation_contexts:
        raise Violation("accepted an RQ without presentation contexts")
    for context in rq.presentation_contexts:
        if context.context_id % 2 == 0 or not context.abstract_syntax or not context.transfer_syntaxes:
            raise Violation(f"accepted presentation context {context}")


@dataclass(frozen=True, slots=True)
class DicomVerdict:
    """What the parser makes of an input, as the dicom service would act on it."""

    outcome: str  # "accepted" | "incomplete" | "rejected" | "aborted"
    response: bytes  # the refusal PDU, or b""
    total: int  # the length of the whole first PDU when accepted


def dicom_verdict(data: bytes) -> DicomVerdict:
    """Parse ``data`` as the first bytes of an association and check the result (raises :class:`Violation`)."""
    try:
        rq = ul.parse_associate_rq(bytearray(data))
    except ul.DicomProtocolError as exc:
        return DicomVerdict(check_refusal_pdu(exc.response), exc.response, 0)
    if rq is None:
        return DicomVerdict("incomplete", b"", 0)
    _check_accepted(rq, data)
    return DicomVerdict("accepted", b"", len(rq.raw))


def check_dicom(data: bytes) -> DicomVerdict:
    """:func:`dicom_verdict`, and the same verdict whatever reads the bytes arrive in: the service parses
    the buffer again after every read and acts on the first refusal, so a prefix that is refused must be
    refused as the whole is."""
    whole = dicom_verdict(data)
    n = len(data)
    h = int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "big")
    for cut in sorted({1, 6, 7, 74, h % (n + 1), (h >> 12) % (n + 1)}):
        if cut >= n:
            break
        prefix = dicom_verdict(data[:cut])
        if prefix.outcome == "accepted":
            if whole.outcome != "accepted" or cut < whole.total:
                raise Violation(f"a prefix of {cut} bytes was accepted, but not the whole")
            continue
        if prefix.outcome != "incomplete" and (prefix.outcome, prefix.response) != (whole.outcome, whole.response):
            raise Violation(
                f"the first {cut} bytes are refused with {prefix.response.hex()}, the whole with "
                f"{whole.outcome} {whole.response.hex()}"
            )
    return whole


# ------------------------------------------------------------------------------------------------- HTTP


def _events(data: bytes, cuts: list[int]) -> tuple[list[tuple[Any, ...]], int | None]:
    """Feed ``data`` in pieces cut at ``cuts``; the events, merged and comparable, and the error status."""
    reader = http1.RequestReader()
    out: list[tuple[Any, ...]] = []
    status: int | None = None
    bounds = [0, *cuts, len(data)]

    def drain() -> None:
        while (event := reader.take()) is not None:
            if isinstance(event, http1.RequestHead):
                out.append(
                    ("head", event.method, event.target, event.version, tuple(event.headers), event.keep_alive,
                     event.upgrade, event.framing, event.content_length, event.expect_continue, event)
                )  # fmt: skip
            elif isinstance(event, bytes):
                if out and out[-1][0] == "body":
                    out[-1] = ("body", out[-1][1] + event)
                else:
                    out.append(("body", event))
            elif isinstance(event, http1.Upgrade):
                out.append(("upgrade", event.rest))
            elif isinstance(event, http1.EndOfMessage):
                out.append(("end", tuple(event.trailers)))
            else:
                raise Violation(f"a request reader produced {event!r}")

    try:
        for a, b in itertools.pairwise(bounds):
            if b > a:
                reader.feed(data[a:b])
            drain()
        reader.eof()
    except http1.HttpProtocolError as exc:
        status = exc.status
        drain()  # what was read before the error is served first (the driver takes whole messages)
    if reader.upgraded and out and out[-1][0] == "upgrade":
        out[-1] = ("upgrade", out[-1][1] + bytes(reader.after_upgrade))
    return out, status


def _comparable(events: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [e[:-1] if e[0] == "head" else e for e in events]


def _check_head(head: http1.RequestHead) -> None:
    if not TOKEN.match(head.method):
        raise Violation(f"accepted method {head.method!r} is not a token (RFC 9110 9.1)")
    if not head.target or any(c <= 0x20 or c == 0x7F for c in head.target):
        raise Violation(f"accepted request target {head.target!r} (RFC 9112 3.2)")
    if head.version not in ("1.0", "1.1"):
        raise Violation(f"accepted HTTP/{head.version}")
    for name, value in head.headers:
        if not TOKEN.match(name):
            raise Violation(f"accepted field name {name!r} (RFC 9110 5.1)")
        if any(c in b"\r\n\0" for c in value):
            raise Violation(f"accepted CR, LF or NUL in the value of {name!r} (RFC 9110 5.5)")
    hosts = head.names.count(b"host")
    if head.version == "1.1" and hosts != 1:
        raise Violation(f"accepted an HTTP/1.1 request with {hosts} Host fields (RFC 9112 3.2)")
    has_te = b"transfer-encoding" in head.names
    if has_te != (head.framing == http1.Framing.CHUNKED):
        raise Violation(f"framing {head.framing} with Transfer-Encoding present: {has_te}")
    if has_te and b"content-length" in head.names:
        raise Violation("accepted Content-Length with Transfer-Encoding (RFC 9112 6.1)")


REWRITE = http1.RequestRewrite(http1.Forwarding(), "http", b"SERVERID")


def _check_forwarded(head: http1.RequestHead) -> None:
    """What pacslb would send the node must read, by pacslb and by h11, as the same request, framed the same."""
    forwarded = http1.proxy_request_head(head, "192.0.2.7", REWRITE, b"pacs.example")
    # (with room for the forwarding fields pacslb adds)
    again = http1.RequestReader(http1.DEFAULT_MAX_HEAD_SIZE + 1024, http1.DEFAULT_MAX_HEADERS + 8)
    try:
        again.feed(forwarded)
    except http1.HttpProtocolError as exc:
        raise Violation(f"the forwarded head is refused by pacslb's own parser: {exc}: {forwarded!r}") from None
    event = again.take()
    rest = []
    while (after := again.take()) is not None:
        rest.append(after)
    # A head, then the end of its (empty) message, then for an upgrade the (empty) rest: one message only.
    if not isinstance(event, http1.RequestHead) or any(
        not (isinstance(e, http1.EndOfMessage) or (isinstance(e, http1.Upgrade) and not e.rest)) for e in rest
    ):
        raise Violation(f"the forwarded head does not read as one head: {forwarded!r}")
    if (event.method, event.target, event.framing, event.content_length) != (
        head.method,
        head.target,
        head.framing,
        head.content_length if head.framing == http1.Framing.LENGTH else event.content_length,
    ):
        raise Violation(f"the forwarded head reads differently: {forwarded!r}")
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(forwarded)
    try:
        request = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise Violation(f"h11 refuses the forwarded head ({exc}): {forwarded!r}") from None
    if not isinstance(request, h11.Request) or request.method != head.method or request.target != head.target:
        raise Violation(f"h11 reads the forwarded head as {request!r}")
    framing: list[object] = []
    for name, value in request.headers:
        if name == b"content-length" and int(value):
            framing.append(int(value))
        elif name == b"transfer-encoding":
            framing.append(value.lower())
    expected: list[object] = {
        http1.Framing.NONE: [],
        http1.Framing.LENGTH: [head.content_length],
        http1.Framing.CHUNKED: [b"chunked"],
    }[head.framing]
    if framing != expected:
        raise Violation(f"h11 frames the forwarded body as {framing}, pacslb as {head.framing}: {forwarded!r}")


@dataclass(frozen=True, slots=True)
class HttpVerdict:
    heads: int  # complete request heads read before the end or the error
    status: int | None  # the status pacslb answers the error with, or None


def check_http(data: bytes) -> HttpVerdict:
    """Parse ``data`` as a client's bytes, whole and in pieces, and check everything (raises Violation)."""
    whole, status = _events(data, [])
    n = len(data)
    h = int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "big")
    cuts = sorted({h % (n + 1), (h >> 8) % (n + 1), (h >> 16) % (n + 1)})
    pieces, piece_status = _events(data, cuts)
    # Which error is found first (431 for too many fields, 400 for a bad one further on) may depend on the
    # reads; whether the input is refused, and what is served before, may not.
    if (_comparable(whole), status is None) != (_comparable(pieces), piece_status is None):
        raise Violation(f"parse depends on read boundaries {cuts}: {whole} {status} / {pieces} {piece_status}")
    if n <= BYTEWISE_UP_TO:
        bytewise, byte_status = _events(data, list(range(1, n)))
        if (_comparable(whole), status is None) != (_comparable(bytewise), byte_status is None):
            raise Violation(f"parse differs when fed byte by byte: {whole} {status} / {bytewise} {byte_status}")
    if status is not None and status not in CLIENT_ERROR_STATUSES:
        raise Violation(f"a client's malformed request answered with {status}")
    heads = [e[-1] for e in whole if e[0] == "head"]
    for head in heads:
        _check_head(head)
        if head.method != b"CONNECT":  # answered 405 by pacslb itself, never forwarded
            _check_forwarded(head)
    return HttpVerdict(len(heads), status)
