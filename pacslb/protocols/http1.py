"""HTTP/1.1 message heads, framing and the header rewrites of a reverse proxy (RFC 9110, RFC 9112): sans-IO.

What it does:
- parses request and response streams with httptools (llhttp, the parser of Node.js), never with a grammar
  of its own: :class:`RequestReader` and :class:`ResponseReader` take bytes and queue *events*: a head
  (:class:`RequestHead` / :class:`ResponseHead`), body data (``bytes``, already de-chunked), the end of a
  message (:class:`EndOfMessage`, with any trailer fields), or the switch to another protocol
  (:class:`Upgrade`, with the bytes that followed the head);
- bounds what a peer can make it hold: a head larger than ``max_head_size`` or with more than
  ``max_headers`` fields is refused (431 for a client, 502 for a node) while it is still arriving;
- knows the framing of every message (RFC 9112 section 6.3): no body, Content-Length, chunked, or, for a
  response, delimited by the close of the connection; a response to HEAD, a 204 or a 304 has no body;
- builds the heads the proxy sends: hop-by-hop fields removed (RFC 9110 7.6.1), the body re-framed,
  X-Forwarded-For/-Proto/-Host and Forwarded (RFC 7239) added, and the balancer's persistence cookie read,
  removed (``indirect``) and set (``Set-Cookie`` with its attributes);
- builds the short responses the balancer answers on its own behalf (400, 408, 431, 502, 503, 504 ...).

What it must not do: any I/O, any clock, any decision about nodes. Errors are :class:`HttpProtocolError`
carrying the status the peer should get; httptools' exceptions never leave this module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, cast

import httptools

from pacslb.errors import PacslbError

#: Largest request or response head (request or status line plus every field) accepted. Browsers send
#: heads of a few KiB; a PACS viewer's cookies and long query strings can reach 16-32 KiB, and nginx
#: accepts 4 x 8 KiB lines. Larger heads are refused with 431 while still arriving, so nobody can make
#: pacslb hold an unbounded head.
DEFAULT_MAX_HEAD_SIZE = 64 * 1024
#: Most header fields in one head: HAProxy's default is 101; a client sending more is abusive or broken.
DEFAULT_MAX_HEADERS = 100
#: Most trailer fields kept from a chunked body (RFC 9112 7.1.2); trailers are rare and small.
MAX_TRAILERS: Final = 32

Headers = list[tuple[bytes, bytes]]

#: Hop-by-hop fields (RFC 9110 7.6.1, and the old Keep-Alive / Proxy-Connection): about one connection,
#: never forwarded. Transfer-Encoding is re-created for the next hop when the body needs it.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Field names as they usually come, lowered: a head's names are looked up here rather than lowered one by
#: one (a look-up makes no new object, and the lowered name it gives is one whose hash is known already, so
#: the sets and comparisons it meets next are cheap). Names not seen before are lowered and added, up to
#: :data:`MAX_LOWERED` of them (beyond that they are only lowered: a client sending made-up names can
#: slow its own heads a little, nothing else).
_LOWERED: Final[dict[bytes, bytes]] = {}
MAX_LOWERED: Final = 1024
#: The names this module and the proxy look for, each the very object they look for: a name lowered to one
#: of them is given as it, so that a look-up finds it by identity (bytes, unlike str, are otherwise compared
#: byte by byte at every hit). Compiled, equal literals are one object (pacslb/compiled.py).
_CANONICAL: Final[dict[bytes, bytes]] = {
    name: name
    for name in (
        *HOP_BY_HOP,
        b"cache-control",
        b"content-length",
        b"cookie",
        b"expect",
        b"forwarded",
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
    )
}


def lowered(name: bytes) -> bytes:
    """``name`` in lower case (see :data:`_LOWERED` and :data:`_CANONICAL`)."""
    low = _LOWERED.get(name)
    if low is None:
        low = name.lower()
        low = _CANONICAL.get(low, low)
        if len(_LOWERED) < MAX_LOWERED:
            _LOWERED[name] = low
    return low


REASONS: dict[int, str] = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    301: "Moved Permanently",
    308: "Permanent Redirect",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class HttpProtocolError(PacslbError):
    """A peer broke HTTP/1.1 (or a limit). ``status`` is what a client should be answered, when it is the
    client that broke it; a node's error is reported to the client as 502."""

    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


class Framing(Enum):
    """How the end of a message body is found (RFC 9112 6.3)."""

    NONE = "none"  # no body
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # chunked transfer coding
    CLOSE = "close"  # responses only: until the connection closes


@dataclass(slots=True, init=False)
class RequestHead:
    """A parsed request head. ``headers`` are as received (names in their original case); ``names`` are
    their names in lower case, in the same order (lowered once, here, so that nothing lowers them again);
    ``first`` maps each of those names to where it first comes (so that looking for a field is a hash
    look-up, not a scan comparing names: see :func:`first_positions`). Both are shared with the next heads
    of the same connection that have the same names: they are never changed."""

    method: bytes
    target: bytes
    version: str  # "1.1", "1.0"
    headers: Headers
    keep_alive: bool  # the client wants the connection kept after this exchange
    upgrade: bool  # a protocol switch was requested (Connection: upgrade + Upgrade)
    framing: Framing
    content_length: int | None
    expect_continue: bool  # Expect: 100-continue
    names: list[bytes]
    first: dict[bytes, int]

    # Written out rather than generated by dataclass: compiled (pacslb/compiled.py), a generated __init__
    # runs as interpreted Python, and one is made for every message.
    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: str,
        headers: Headers,
        keep_alive: bool,
        upgrade: bool,
        framing: Framing,
        content_length: int | None,
        expect_continue: bool,
        names: list[bytes],
        first: dict[bytes, int] | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.framing = framing
        self.content_length = content_length
        self.expect_continue = expect_continue
        self.names = names
        self.first = first_positions(names) if first is None else first

    @property
    def path(self) -> str:
        """The target without its query (see :func:`target_path`)."""
        return target_path(self.target)

    def header(self, name: bytes) -> bytes | None:
        """The first value of a field (``name`` in lower case), or None."""
        at = self.first.get(name)
        return None if at is None else self.headers[at][1]


@dataclass(slots=True, init=False)
class ResponseHead:
    """A parsed response head; ``names`` and ``first`` as in :class:`RequestHead`. (No version: the client gets the
    balancer's own, HTTP/1.1, and whether the node keeps the connection is ``keep_alive``.)"""

    status: int
    reason: bytes
    headers: Headers
    keep_alive: bool  # the node keeps the connection after this response
    framing: Framing
    content_length: int | None
    names: list[bytes]
    first: dict[bytes, int]

    def __init__(  # written out: see RequestHead
        self,
        status: int,
        reason: bytes,
        headers: Headers,
        keep_alive: bool,
        framing: Framing,
        content_length: int | None,
        names: list[bytes],
        first: dict[bytes, int] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.keep_alive = keep_alive
        self.framing = framing
        self.content_length = content_length
        self.names = names
        self.first = first_positions(names) if first is None else first

    @property
    def informational(self) -> bool:
        """An interim 1xx response (other than 101): a final response follows."""
        return 100 <= self.status < 200 and self.status != 101


@dataclass(slots=True)
class EndOfMessage:
    """The message is complete. ``trailers`` are the trailer fields of a chunked body, if any."""

    trailers: Headers = field(default_factory=list)


@dataclass(slots=True)
class Upgrade:
    """The message before switched protocols; ``rest`` is what followed its head (bytes of the new protocol)."""

    rest: bytes


Event = RequestHead | ResponseHead | bytes | EndOfMessage | Upgrade
END: Final = EndOfMessage()  # shared: the usual end, without trailers (never mutated)


def target_path(target: bytes) -> str:
    """A request target without its query (the query of a viewer URL can carry patient identifiers, so the
    access log leaves it out)."""
    return target.partition(b"?")[0].decode("latin-1")


def header_value(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _tokens(headers: Headers, name: bytes) -> list[bytes]:
    """The comma-separated tokens of every field called ``name``, lower-cased."""
    out: list[bytes] = []
    for key, value in headers:
        if key.lower() == name:
            out.extend(t.strip().lower() for t in value.split(b",") if t.strip())
    return out


def _content_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    # llhttp has already refused malformed and conflicting values; this only converts (a list of equal
    # values, "5, 5", to the first). Digits alone, the usual value, are added up here: compiled, a loop over
    # a few bytes costs a fifth of calling int().
    size = len(value)
    if 0 < size <= 18:
        n = 0
        for i in range(size):
            digit = value[i] - 48
            if digit < 0 or digit > 9:
                break
            n = n * 10 + digit
        else:
            return n
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return int(value.split(b",")[0].strip())
    except ValueError:
        raise HttpProtocolError(f"invalid Content-Length {value!r}") from None


#: Fields a ``Connection`` option may not name (RFC 9110 7.6.1 lets a sender make any field hop-by-hop, but a
#: proxy that removed these would change where the message ends, or which site it is for, between what it read
#: and what the next hop reads: the root of request smuggling). Such a message is refused, never forwarded.
PROTECTED_FROM_CONNECTION: Final = frozenset({b"content-length", b"host"})

#: A Host field value (RFC 9110 7.2: uri-host [ ":" port ], RFC 3986 3.2.2): an IP literal in brackets, or a
#: reg-name / IPv4 address, then an optional port. Anything else is refused with 400 (RFC 9112 3.2).
_HOST_VALUE: Final = re.compile(rb"(?:\[[0-9A-Za-z:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
#: Host values found valid so far (a service sees few), bounded as :data:`_LOWERED` is.
_VALID_HOSTS: Final[set[bytes]] = set()


def _valid_host(value: bytes) -> bool:
    """Whether ``value`` is a well-formed Host field value (see :data:`_HOST_VALUE`)."""
    if value in _VALID_HOSTS:
        return True
    if _HOST_VALUE.fullmatch(value) is None:
        return False
    if len(_VALID_HOSTS) < MAX_LOWERED:
        _VALID_HOSTS.add(value)
    return True


def first_positions(names: list[bytes]) -> dict[bytes, int]:
    """Where each name of ``names`` first comes. (The names are :func:`lowered`'s, whose hashes are known, so
    this costs a few instructions per field; ``name in names`` compared ``name`` with each in turn.)"""
    first: dict[bytes, int] = {}
    for i in range(len(names)):
        first.setdefault(names[i], i)
    return first


def _check_connection_options(names: list[bytes], first: dict[bytes, int], headers: Headers, status: int) -> None:
    """Refuse a message whose ``Connection`` field names a field in :data:`PROTECTED_FROM_CONNECTION`.

    Raises:
        HttpProtocolError: with ``status`` (400 for a request, 502 for a response).
    """
    named = _named_by_connection(names, first, headers)
    if named and not named.isdisjoint(PROTECTED_FROM_CONNECTION):
        fields = b", ".join(sorted(named & PROTECTED_FROM_CONNECTION)).decode("latin-1")
        raise HttpProtocolError(f"Connection names {fields}, which a proxy may not remove", status)


def _first(first: dict[bytes, int], headers: Headers, name: bytes) -> bytes | None:
    """The value of the first field ``name`` (lower case), or None."""
    at = first.get(name)
    return None if at is None else headers[at][1]


def _codings(names: list[bytes], first: dict[bytes, int], headers: Headers) -> list[bytes]:
    """The transfer codings of every Transfer-Encoding field, in order, lower-cased."""
    if b"transfer-encoding" not in first:
        return []
    return [
        t.strip().lower()
        for low, (_, value) in zip(names, headers, strict=True)
        if low == b"transfer-encoding"
        for t in value.split(b",")
        if t.strip()
    ]


class _Reader:
    """Shared machinery of the request and response readers: httptools callbacks -> queued events.

    The reader parses everything it is fed, so pipelined messages queue up behind each other; the driver
    bounds that by not feeding more while ``body_bytes`` (body data queued and not yet taken) is high.
    """

    __slots__ = (
        "_begun",
        "_feeding",
        "_fields",
        "_first",
        "_head_first",
        "_head_split",
        "_in_chunk_head",
        "_names",
        "_raw_names",
        "_trailer_size",
        "_url",
        "after_upgrade",
        "body_bytes",
        "events",
        "head_size",
        "in_head",
        "in_message",
        "max_head_size",
        "max_headers",
        "parser",
        "status",
        "upgraded",
    )

    #: The status a too-large head gets: 431 from a client; a node's is reported as 502 (set by subclasses).
    LIMIT_STATUS = 431
    #: What a malformed message is answered with.
    ERROR_STATUS = 400

    def __init__(self, max_head_size: int, max_headers: int) -> None:
        self.events: list[Event] = []  # (a list: compiled, its append and pop are native; a deque's are not)
        self.body_bytes = 0
        self.max_head_size = max_head_size
        self.max_headers = max_headers
        # The fields of the head being read, then of its trailers (a new list once the head is complete).
        self._fields: Headers = []
        self.head_size = 0
        self.in_head = False
        self.in_message = False
        self.upgraded = False
        self.after_upgrade = bytearray()
        self.status = b""
        self._url = b""
        self._feeding = 0  # the size of what feed() is parsing
        self._begun = 0  # messages begun so far (feed() tells a head that began in its read from an older one)
        self._head_first = 0  # the size of the read in which the current head began
        self._head_split = False  # the current head went on past the read in which it began
        self._in_chunk_head = False  # a chunk header was read and no data of its chunk yet (the last: trailers)
        self._trailer_size = 0  # bytes of reads that went wholly into trailer fields (see feed())
        # The last head's field names as received, and its ``names`` and ``first``: a client (or node) sends
        # the same names in the same order head after head, and those are then given again, not remade.
        self._raw_names: list[bytes] = []
        self._names: list[bytes] = []
        self._first: dict[bytes, int] = {}

    # -- httptools callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun += 1
        self._in_chunk_head = False
        self._trailer_size = 0
        self.in_message = self.in_head = True
        self.head_size = 0
        self._head_first = self._feeding
        self._head_split = False
        if self._fields:
            self._fields = []
        self._url = self.status = b""

    # These run for every piece of every message: they only collect. The size of a head is checked once it
    # is complete (on_headers_complete) and, while it is incomplete, by feed(): a read that neither completes
    # the head it continues nor begins another went wholly into that head and counts, so an incomplete head
    # never holds more than one read past the limit. (A read that completes a head, or begins one, may carry
    # other messages or a body besides: it is not counted as head.)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_status(self, status: bytes) -> None:
        self.status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for every field of every message, so it only collects (httptools never passes a value of
        # None). Their number is bounded where a head is complete and, while it is not, by feed().
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        headers = self._fields
        if len(headers) > self.max_headers:
            raise HttpProtocolError(f"more than {self.max_headers} header fields", self.LIMIT_STATUS)
        self._fields = []  # what comes next, if anything, is trailers
        # What arrived while it did: the read that completes it, those wholly in it (head_size) and the one it
        # began in. When that is over the limit, it may be too large: count it exactly, as sent ("name:
        # value" and CRLF per field).
        arrived = self._feeding + self.head_size + (self._head_first if self._head_split else 0)
        if arrived > self.max_head_size:
            size = sum(len(n) + len(v) + 4 for n, v in headers) + len(self._url) + len(self.status)
            if size > self.max_head_size:
                raise HttpProtocolError(f"head larger than {self.max_head_size} bytes", self.LIMIT_STATUS)
        count = len(headers)
        raw = self._raw_names
        if count == len(raw):
            i = 0
            while i < count and headers[i][0] == raw[i]:
                i += 1
            if i == count:  # the names of the last head (see __init__)
                self._emit_head(headers, self._names, self._first)
                return
        raw = []
        names: list[bytes] = []  # lowered once per head (see RequestHead)
        first: dict[bytes, int] = {}
        for i in range(count):
            name = headers[i][0]
            raw.append(name)
            low = lowered(name)
            names.append(low)
            first.setdefault(low, i)
        self._raw_names = raw
        self._names = names
        self._first = first
        self._emit_head(headers, names, first)

    def on_body(self, body: bytes) -> None:
        self._in_chunk_head = False
        self.body_bytes += len(body)
        self.events.append(body)

    def on_chunk_header(self) -> None:
        self._in_chunk_head = True

    def on_chunk_complete(self) -> None:
        self._in_chunk_head = False

    def on_message_complete(self) -> None:
        self.in_message = False
        self.events.append(EndOfMessage(self._take_trailers()) if self._fields else END)

    def _take_trailers(self) -> Headers:
        """The trailer fields collected (the first :data:`MAX_TRAILERS`, see :meth:`_bound_fields`)."""
        trailers = self._fields
        self._fields = []
        return trailers if len(trailers) <= MAX_TRAILERS else trailers[:MAX_TRAILERS]

    def _grow(self, size: int) -> None:
        self.head_size += size
        if self.head_size > self.max_head_size:
            raise HttpProtocolError(f"head larger than {self.max_head_size} bytes", self.LIMIT_STATUS)

    def _emit_head(self, headers: Headers, names: list[bytes], first: dict[bytes, int]) -> None:
        raise NotImplementedError

    # -- feeding -------------------------------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        """Parse ``data``; events go to :attr:`events`.

        Raises:
            HttpProtocolError: malformed input, or a limit exceeded.
        """
        if self.upgraded:
            self.after_upgrade += data  # bytes of the new protocol; the driver takes them with the tunnel
            return
        continued = self.in_head and self._begun  # the head this read continues, if any
        if continued:
            self._head_split = True
        trailing = self._in_chunk_head and self._begun  # the chunk header (the last one: trailers) it continues
        self._feeding = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:  # (one name per type, for mypyc)
            self.upgraded = True
            offset = int(upgrade.args[0])
            self.events.append(Upgrade(bytes(data[offset:])))
        except httptools.HttpParserCallbackError as failed:
            cause = failed.__context__
            if isinstance(cause, HttpProtocolError):
                raise cause from None
            raise  # a bug in a callback: not the peer's fault
        except httptools.HttpParserError as exc:
            detail = exc.args[0] if exc.args else type(exc).__name__
            raise HttpProtocolError(f"malformed message: {detail}", self.ERROR_STATUS) from exc
        if self._fields:  # fields of a head still incomplete, or trailer fields
            self._bound_fields()
        if continued and self.in_head and self._begun == continued:
            # All of it went into a head that is still incomplete, whose fields httptools holds: bound them.
            self._grow(len(data))
        elif trailing and self._in_chunk_head and self._begun == trailing:
            # No chunk data, no end of chunk: all of it went into the trailer fields after the last chunk,
            # which httptools holds as they arrive (bytes after a chunk header are otherwise its data).
            self._trailer_size += len(data)
            if self._trailer_size > self.max_head_size:
                raise HttpProtocolError(f"trailer fields larger than {self.max_head_size} bytes", self.LIMIT_STATUS)

    def _bound_fields(self) -> None:
        """After a read: too many fields in an incomplete head are refused, as they would be once it is
        complete; trailer fields past :data:`MAX_TRAILERS` are dropped."""
        fields = self._fields
        if self.in_head:
            if len(fields) > self.max_headers:
                raise HttpProtocolError(f"more than {self.max_headers} header fields", self.LIMIT_STATUS)
        elif len(fields) > MAX_TRAILERS:
            del fields[MAX_TRAILERS:]

    parser: httptools.HttpRequestParser | httptools.HttpResponseParser

    def take(self) -> Event | None:
        """The next event, or None when more bytes are needed."""
        if not self.events:
            return None
        event = self.events.pop(0)
        if type(event) is bytes:
            self.body_bytes -= len(event)
        return event


class RequestReader(_Reader):
    """Reads the requests of one client connection, one after the other (pipelining included)."""

    __slots__ = ()

    def __init__(self, max_head_size: int = DEFAULT_MAX_HEAD_SIZE, max_headers: int = DEFAULT_MAX_HEADERS) -> None:
        super().__init__(max_head_size, max_headers)
        self.parser = httptools.HttpRequestParser(self)

    def _emit_head(self, headers: Headers, names: list[bytes], first: dict[bytes, int]) -> None:
        parser = cast(httptools.HttpRequestParser, self.parser)
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise HttpProtocolError(f"HTTP/{version} is not supported", 505 if version >= "2" else 400)
        if b"host" in first:
            if len(first) != len(names) and names.count(b"host") != 1:  # (some name comes twice)
                raise HttpProtocolError("more than one Host field (RFC 9112 3.2)")
            if not _valid_host(headers[first[b"host"]][1]):
                raise HttpProtocolError("invalid Host field value (RFC 9112 3.2)")
        elif version == "1.1":
            raise HttpProtocolError("HTTP/1.1 request without Host (RFC 9112 3.2)")
        if b"connection" in first:
            _check_connection_options(names, first, headers, 400)
        length = _content_length(_first(first, headers, b"content-length"))
        codings = _codings(names, first, headers) if b"transfer-encoding" in first else None
        if codings:
            # llhttp has refused a final coding other than chunked, chunked twice, and Content-Length beside
            # it. What is left to refuse: an HTTP/1.0 message with Transfer-Encoding, whose framing is faulty
            # (RFC 9112 6.1), and codings before chunked, which a node would have to undo and pacslb cannot
            # pass on faithfully (RFC 9112 6.1: 501 for a coding not understood).
            if version == "1.0":
                raise HttpProtocolError("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)")
            if len(codings) != 1:
                coding = codings[0].decode("latin-1")
                raise HttpProtocolError(f"transfer coding {coding!r} is not implemented", 501)
            framing = Framing.CHUNKED
        elif codings is not None:
            raise HttpProtocolError("empty Transfer-Encoding field")
        elif length:
            framing = Framing.LENGTH
        else:
            framing = Framing.NONE
        if b"expect" in first:
            expect_continue = headers[first[b"expect"]][1].strip().lower() == b"100-continue"
        else:
            expect_continue = False
        self.events.append(
            RequestHead(
                parser.get_method(),
                self._url,
                version,
                headers,
                parser.should_keep_alive(),
                parser.should_upgrade(),
                framing,
                length,
                expect_continue,
                names,
                first,
            )
        )

    def eof(self) -> None:
        """The client closed its sending side; fine between requests.

        Raises:
            HttpProtocolError: the client closed in the middle of a request.
        """
        if self.in_message and not self.upgraded:
            raise HttpProtocolError("client closed in the middle of a request")


class ResponseReader(_Reader):
    """Reads the response to one request (and the interim 1xx responses before it).

    A new reader is made for every request: the framing of a response depends on the request (HEAD), and
    httptools cannot be told that a response has no body.
    """

    __slots__ = ("extra", "finished", "head", "method_head", "upgrade_requested")

    LIMIT_STATUS = 502
    ERROR_STATUS = 502

    def __init__(
        self,
        method: bytes,
        upgrade_requested: bool = False,
        max_head_size: int = DEFAULT_MAX_HEAD_SIZE,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        super().__init__(max_head_size, max_headers)
        self.parser = httptools.HttpResponseParser(self)
        self.method_head = method == b"HEAD"
        self.upgrade_requested = upgrade_requested
        self.finished = False  # the final response is complete
        self.extra = False  # bytes came after the final response: the connection cannot be reused
        self.head: ResponseHead | None = None  # the last head seen (an interim one until the final comes)

    def next_response(self, method: bytes, upgrade_requested: bool = False) -> None:
        """Get ready for the response to the next request on the same keep-alive connection, as a new
        reader would be (but without making one per request).

        Only for a connection whose last response was read to its end with nothing after it (the driver
        reuses no other). After a response to HEAD, httptools still expects the body the head announced, so
        that parser is replaced; after any other, it already waits for the next message.
        """
        if self.method_head or self.in_message or self.upgraded or self.events:
            self.parser = httptools.HttpResponseParser(self)
            self.events.clear()
            self.in_message = self.in_head = False
        self.method_head = method == b"HEAD"
        self.upgrade_requested = upgrade_requested
        self.finished = False
        self.extra = False
        self.head = None
        self.body_bytes = 0
        self.upgraded = False
        if self.after_upgrade:
            self.after_upgrade.clear()

    def on_message_begin(self) -> None:
        if self.finished:
            self.extra = True  # a message after the final response: the connection cannot be reused
        super().on_message_begin()

    def _emit_head(self, headers: Headers, names: list[bytes], first: dict[bytes, int]) -> None:
        if self.extra:
            return  # the head of a message after the final response: never forwarded
        parser = cast(httptools.HttpResponseParser, self.parser)
        status = parser.get_status_code()
        length = _content_length(_first(first, headers, b"content-length"))
        te = _codings(names, first, headers) if b"transfer-encoding" in first else None
        if b"connection" in first:
            _check_connection_options(names, first, headers, 502)
        if te is not None:
            # Only chunked is passed on (de-chunked, then chunked again for the client): another coding would
            # reach the client undone and unannounced, and Transfer-Encoding in HTTP/1.0 is faulty framing
            # (RFC 9112 6.1). Either is refused rather than forwarded changed.
            if te != [b"chunked"]:
                raise HttpProtocolError(f"transfer coding {b', '.join(te).decode('latin-1')!r} is not passed on", 502)
            if parser.get_http_version() != "1.1":
                raise HttpProtocolError("Transfer-Encoding in an HTTP/1.0 response (RFC 9112 6.1)", 502)
        if status < 200 or status == 204 or status == 304 or self.method_head:
            framing = Framing.NONE
        elif te:
            framing = Framing.CHUNKED if te[-1] == b"chunked" else Framing.CLOSE
        elif length is not None:
            framing = Framing.LENGTH if length else Framing.NONE
        else:
            framing = Framing.CLOSE
        if status == 101 and not self.upgrade_requested:
            raise HttpProtocolError("101 Switching Protocols to a request that asked for no upgrade", 502)
        keep_alive = parser.should_keep_alive() and framing is not Framing.CLOSE
        head = ResponseHead(status, self.status, headers, keep_alive, framing, length, names, first)
        self.head = head
        self.events.append(head)
        if self.method_head and status >= 200:
            # httptools would wait for the Content-Length bytes of the GET this HEAD stands for: the
            # response ends here, and anything after it makes the connection unusable.
            self.events.append(END)
            self.finished = True

    def on_body(self, body: bytes) -> None:
        if self.finished:
            self.extra = True
            return
        self._in_chunk_head = False
        self.body_bytes += len(body)
        self.events.append(body)

    def take_rest(self) -> list[Event] | None:
        """Once the final response is complete: every event still queued (its body pieces, then its end),
        as :meth:`take` would give them one by one; None while the response is still arriving."""
        if not self.finished or self.upgraded:
            return None
        rest = list(self.events)
        self.events.clear()
        self.body_bytes = 0
        return rest

    def on_message_complete(self) -> None:
        self.in_message = False
        head = self.head
        if self.finished or head is None:
            return
        if head.status < 200:
            return  # an interim response ends with its head; a 101 is followed by the Upgrade event
        self.finished = True
        self.events.append(EndOfMessage(self._take_trailers()) if self._fields else END)

    def feed(self, data: bytes | memoryview) -> None:
        if self.finished and not self.upgraded:
            self.extra = True
            return
        try:
            super().feed(data)
        except HttpProtocolError:
            if not self.finished or self.upgraded:
                raise
            # Garbage in the read that completed the final response, after it: the response stands; the
            # connection goes (it is not reused).
            self.extra = True

    def eof(self) -> None:
        """The node closed its sending side. Completes a close-delimited body.

        Raises:
            HttpProtocolError: the node closed before its response was complete (502 if nothing was sent
                to the client yet; the driver decides).
        """
        if self.finished or self.upgraded:
            return
        head = self.head
        if head is None or head.informational or self.in_head:
            raise HttpProtocolError("node closed the connection before a complete response head", 502)
        if head.framing is Framing.CLOSE:  # the only body that ends this way
            self.finished = True
            self.in_message = False
            self.events.append(END)
            return
        raise HttpProtocolError("node closed the connection in the middle of a response body", 502)


# -- building heads ----------------------------------------------------------------------------------------


def _connection_named(headers: Headers) -> set[bytes]:
    """Field names listed in Connection (they are hop-by-hop too, RFC 9110 7.6.1)."""
    return set(_tokens(headers, b"connection"))


def end_to_end(headers: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """``headers`` without hop-by-hop fields, without the fields Connection names, without ``drop``."""
    named = _connection_named(headers)
    out: Headers = []
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in named or low in drop:
            continue
        out.append((name, value))
    return out


def serialize_head(start_line: bytes, headers: Headers) -> bytes:
    parts = [start_line, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """One chunk of the chunked transfer coding (RFC 9112 7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """The last chunk, with trailer fields (forwarded as received, less hop-by-hop ones)."""
    if not trailers:
        return b"0\r\n\r\n"
    return serialize_head(b"0", end_to_end(list(trailers)))


def format_host_for(ip: str) -> str:
    """A client address as the Forwarded header's ``for=`` wants it (RFC 7239 6: IPv6 quoted, bracketed)."""
    return f'"[{ip}]"' if ":" in ip else ip


@dataclass(frozen=True, slots=True)
class Forwarding:
    """Which forwarding fields a proxied request gets (configured per service)."""

    x_forwarded_for: bool = True
    x_forwarded_proto: bool = True
    x_forwarded_host: bool = True
    forwarded: bool = False


def forwarding_headers(
    headers: Headers, client_ip: str, proto: str, options: Forwarding
) -> tuple[Headers, list[tuple[bytes, bytes]]]:
    """Split ``headers`` into those kept and the forwarding fields to add for this hop.

    X-Forwarded-For is appended to (an earlier proxy's addresses stay first); X-Forwarded-Proto and
    X-Forwarded-Host describe what *this* balancer received, so a client's own are replaced; Forwarded
    (RFC 7239) is appended to like X-Forwarded-For.
    """
    drop: set[bytes] = set()
    added: list[tuple[bytes, bytes]] = []
    ip = client_ip.encode()
    host = header_value(headers, b"host")
    if options.x_forwarded_for:
        previous = [v for k, v in headers if k.lower() == b"x-forwarded-for"]
        drop.add(b"x-forwarded-for")
        added.append((b"X-Forwarded-For", b", ".join([*previous, ip])))
    if options.x_forwarded_proto:
        drop.add(b"x-forwarded-proto")
        added.append((b"X-Forwarded-Proto", proto.encode()))
    if options.x_forwarded_host and host is not None:
        drop.add(b"x-forwarded-host")
        added.append((b"X-Forwarded-Host", host))
    if options.forwarded:
        previous = [v for k, v in headers if k.lower() == b"forwarded"]
        drop.add(b"forwarded")
        element = f"for={format_host_for(client_ip)};proto={proto}".encode()
        if host is not None:
            element += b';host="' + host.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        added.append((b"Forwarded", b", ".join([*previous, element])))
    kept = [(k, v) for k, v in headers if k.lower() not in drop] if drop else headers
    return kept, added


# -- cookies (RFC 6265) --------------------------------------------------------------------------------------


def cookie_values(headers: Headers, name: bytes) -> list[bytes]:
    """Every value of cookie ``name`` in the request's Cookie fields (a browser may send one twice, for two
    paths; every one is a candidate)."""
    found: list[bytes] = []
    for key, value in headers:
        if key.lower() == b"cookie":
            _add_cookie_values(value, name, found)
    return found


class CookieMemo:
    """What the Cookie field a client connection sent last says of the persistence cookie. A browser sends
    the same field with every request (until one of its cookies changes), so a connection reads it once,
    not for every request."""

    __slots__ = ("field", "kept", "name", "values")

    def __init__(self) -> None:
        self.field: bytes | None = None
        self.name = b""
        self.values: list[bytes] = []  # cookie ``name``'s values in ``field`` (shared: never changed)
        self.kept = b""  # ``field`` without cookie ``name`` (empty: nothing else is left)

    def read(self, field: bytes, name: bytes) -> None:
        if field == self.field and name == self.name:
            return
        values: list[bytes] = []
        _add_cookie_values(field, name, values)
        self.values = values
        self.kept = _without_cookie(field, name) if field.find(name) >= 0 else field  # (find: see below)
        self.field = field
        self.name = name


def request_cookie_values(head: RequestHead, name: bytes, memo: CookieMemo | None = None) -> list[bytes]:
    """:func:`cookie_values` of a parsed request, found with its lowered names (and read from ``memo``,
    the connection's, when the request has one Cookie field). The list is not to be changed."""
    found: list[bytes] = []
    names = head.names
    first = head.first
    at = first.get(b"cookie")
    if at is None:
        return found
    if len(first) == len(names):  # no name comes twice: one Cookie field
        if memo is not None:
            memo.read(head.headers[at][1], name)
            return memo.values
        _add_cookie_values(head.headers[at][1], name, found)
        return found
    headers = head.headers
    for i in range(at, len(names)):
        if names[i] == b"cookie":
            _add_cookie_values(headers[i][1], name, found)
    return found


def _add_cookie_values(value: bytes, name: bytes, found: list[bytes]) -> None:
    """Add the values of cookie ``name`` in one Cookie field's ``value`` to ``found``."""
    if value.find(name) < 0:  # (find, not ``in``: see proxy_request_head)
        return
    for pair in value.split(b";"):
        cname, sep, cvalue = pair.strip().partition(b"=")
        if sep and cname == name:
            found.append(cvalue.strip().strip(b'"'))


def remove_cookie(headers: Headers, name: bytes) -> Headers:
    """``headers`` with cookie ``name`` taken out of every Cookie field (a field left empty goes)."""
    out: Headers = []
    for key, value in headers:
        if key.lower() != b"cookie" or value.find(name) < 0:  # (find: see proxy_request_head)
            out.append((key, value))
            continue
        kept = _without_cookie(value, name)
        if kept:
            out.append((key, kept))
    return out


def _without_cookie(value: bytes, name: bytes) -> bytes:
    """A Cookie field's value without cookie ``name`` (empty when nothing else is left)."""
    if value.find(b";") < 0:  # one cookie (as when the persistence cookie is the site's only one)
        pair = value.strip()
        return b"" if pair.partition(b"=")[0].strip() == name else pair
    pairs = [p.strip() for p in value.split(b";")]
    return b"; ".join([p for p in pairs if p and p.partition(b"=")[0].strip() != name])


@dataclass(frozen=True, slots=True)
class CookieAttributes:
    """Attributes of the persistence cookie the balancer sets (RFC 6265 4.1)."""

    path: str = "/"
    domain: str | None = None
    max_age: int | None = None  # seconds; None: a session cookie, gone when the browser closes
    httponly: bool = True
    secure: bool = False
    samesite: str | None = "Lax"


def set_cookie(name: str, value: str, attributes: CookieAttributes) -> bytes:
    """The value of a Set-Cookie field."""
    parts = [f"{name}={value}"]
    if attributes.path:
        parts.append(f"Path={attributes.path}")
    if attributes.domain:
        parts.append(f"Domain={attributes.domain}")
    if attributes.max_age is not None:
        parts.append(f"Max-Age={attributes.max_age}")
    if attributes.httponly:
        parts.append("HttpOnly")
    if attributes.secure:
        parts.append("Secure")
    if attributes.samesite:
        parts.append(f"SameSite={attributes.samesite}")
    return "; ".join(parts).encode()


def make_private(headers: Headers) -> Headers:
    """Mark a response uncacheable by shared caches ("nocache"): it carries a client's own cookie, which a
    shared cache must not hand to other clients. ``public`` and ``s-maxage`` go, ``private`` is added."""
    out: Headers = []
    directives: list[bytes] = []
    for key, value in headers:
        if key.lower() == b"cache-control":
            directives += _shared_cache_directives_removed(value)
        else:
            out.append((key, value))
    out.append((b"Cache-Control", _private_cache_control(directives)))
    return out


def _shared_cache_directives_removed(value: bytes) -> list[bytes]:
    """The directives of a Cache-Control value, less those that allow a shared cache to store it."""
    return [
        d.strip()
        for d in value.split(b",")
        if d.strip() and d.strip().lower() != b"public" and not d.strip().lower().startswith(b"s-maxage")
    ]


def _private_cache_control(directives: list[bytes]) -> bytes:
    lowered = [d.lower() for d in directives]
    if b"private" not in lowered and b"no-store" not in lowered:
        directives.append(b"private")
    return b", ".join(directives)


#: The Cache-Control field of a response made private that had none.
_PRIVATE_ONLY: Final = b"Cache-Control: " + _private_cache_control([])


# -- the heads the proxy sends, each in one pass --------------------------------------------------------------
#
# The functions above are the rules, one per concern. A proxy applies all of them to every message, so the
# two below do the same in a single pass over the fields, with the names lowered once by the reader; the unit
# tests check that they give the very bytes the composition of the rules gives.


class RequestRewrite:
    """What a service does to every request head it forwards (worked out once per config).

    Args:
        forwarding: the forwarding fields to add.
        proto: the scheme the client used ("http" or "https").
        strip_cookie: the name of a cookie to remove before the node sees it (the persistence cookie
            with ``indirect``), or None.
    """

    __slots__ = ("forwarding", "proto", "proto_line", "special", "strip_cookie")

    def __init__(self, forwarding: Forwarding, proto: str, strip_cookie: bytes | None) -> None:
        self.forwarding = forwarding
        self.proto = proto
        self.proto_line = b"X-Forwarded-Proto: " + proto.encode()
        self.strip_cookie = strip_cookie
        special = set(HOP_BY_HOP) | {b"expect"}
        if strip_cookie is not None:
            special.add(b"cookie")
        for enabled, name in (
            (forwarding.x_forwarded_for, b"x-forwarded-for"),
            (forwarding.x_forwarded_proto, b"x-forwarded-proto"),
            (forwarding.x_forwarded_host, b"x-forwarded-host"),
            (forwarding.forwarded, b"forwarded"),
        ):
            if enabled:
                special.add(name)
        #: Names the pass must look at (all others are copied as they are).
        self.special = frozenset(special)


def _named_by_connection(names: list[bytes], first: dict[bytes, int], headers: Headers) -> frozenset[bytes]:
    """Field names listed in the Connection fields (hop-by-hop too, RFC 9110 7.6.1); there is one at least."""
    at = first[b"connection"]
    count = 1 if len(first) == len(names) else names.count(b"connection")  # (when no name comes twice: one)
    if count == 1:
        value = headers[at][1]
        if value == b"keep-alive" or value.lower() == b"keep-alive":
            return _NOTHING  # the usual case, and hop-by-hop anyway
    named: set[bytes] = set()
    for _ in range(count):
        at = names.index(b"connection", at)
        options = headers[at][1].lower()
        at += 1
        if options != b"keep-alive":  # the usual value, hop-by-hop anyway
            named.update(t.strip() for t in options.split(b",") if t.strip())
    return frozenset(named)


_NOTHING: Final[frozenset[bytes]] = frozenset()


def proxy_request_head(
    head: RequestHead, client_ip: str, rewrite: RequestRewrite, default_host: bytes, memo: CookieMemo | None = None
) -> bytes:
    """The head that forwards ``head`` to a node: the request line as HTTP/1.1; the end-to-end fields
    (hop-by-hop ones and Expect removed, :func:`end_to_end`); the persistence cookie removed
    (:func:`remove_cookie`; read from ``memo``, the client connection's, when given); the forwarding fields
    (:func:`forwarding_headers`); Host ``default_host`` for an HTTP/1.0 request without one; and the body's
    framing and the Upgrade fields again.
    """
    headers = head.headers
    names = head.names
    first = head.first
    named = _named_by_connection(names, first, headers) if b"connection" in first else _NOTHING
    special = rewrite.special
    options = rewrite.forwarding
    strip = rewrite.strip_cookie
    host = None if b"host" in named else head.header(b"host")
    previous_for: list[bytes] = []
    previous_forwarded: list[bytes] = []
    # The head's parts in one list, joined once (by index, and appended one by one: compiled, a zip makes a
    # tuple per field, and a join per line costs more than the appends). A field whose name is not special
    # is copied as it came; asking first whether any is (isdisjoint) costs more than asking each.
    out = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
    for i in range(len(names)):
        low = names[i]
        field = headers[i]
        value = field[1]
        if low in special or low in named:
            if low in HOP_BY_HOP or low in named or low == b"expect":
                continue
            if low == b"cookie" and strip is not None:
                if memo is not None:
                    memo.read(value, strip)
                    kept = memo.kept
                # (find, not ``in``: ``bytes in bytes`` first tries the operand as an integer, and the
                # TypeError it raises and clears costs more than the search)
                elif value.find(strip) >= 0:
                    kept = _without_cookie(value, strip)
                else:
                    kept = value
                if value and not kept:
                    continue  # the persistence cookie was all it had
                value = kept
            elif low == b"x-forwarded-for":
                previous_for.append(value)
                continue
            elif low == b"forwarded":
                previous_forwarded.append(value)
                continue
            elif low == b"x-forwarded-proto" or (low == b"x-forwarded-host" and host is not None):
                continue
        out.append(field[0])
        out.append(b": ")
        out.append(value)
        out.append(b"\r\n")
    if options.x_forwarded_for:
        if previous_for:
            out.append(b"X-Forwarded-For: " + b", ".join([*previous_for, client_ip.encode()]))
        else:
            out.append(_forwarded_for(client_ip))
        out.append(b"\r\n")
    if options.x_forwarded_proto:
        out.append(rewrite.proto_line)
        out.append(b"\r\n")
    if options.x_forwarded_host and host is not None:
        out.append(b"X-Forwarded-Host: " + host + b"\r\n")
    if options.forwarded:
        element = f"for={format_host_for(client_ip)};proto={rewrite.proto}".encode()
        if host is not None:
            element += b';host="' + host.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        out.append(b"Forwarded: " + b", ".join([*previous_forwarded, element]) + b"\r\n")
    if head.version == "1.0" and b"host" not in first:
        out.append(b"Host: " + default_host + b"\r\n")
    if head.framing is Framing.CHUNKED:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if head.upgrade:
        out.append(b"Connection: Upgrade\r\nUpgrade: " + (head.header(b"upgrade") or b"") + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


#: X-Forwarded-For fields made so far, by client address (bounded as :data:`_LOWERED` is).
_FORWARDED_FOR: Final[dict[str, bytes]] = {}


def _forwarded_for(client_ip: str) -> bytes:
    """``X-Forwarded-For: <client_ip>``, made once per client address."""
    line = _FORWARDED_FOR.get(client_ip)
    if line is None:
        line = b"X-Forwarded-For: " + client_ip.encode()
        if len(_FORWARDED_FOR) < MAX_LOWERED:
            _FORWARDED_FOR[client_ip] = line
    return line


#: The status lines made so far, by status: (reason phrase as received, line). Statuses are three digits.
_STATUS_LINES: Final[dict[int, tuple[bytes, bytes]]] = {}


def _status_line(status: int, reason: bytes) -> bytes:
    """``HTTP/1.1 <status> <reason>`` (a missing reason phrase as "-"), made once per status and reason."""
    known = _STATUS_LINES.get(status)
    if known is not None and known[0] == reason:
        return known[1]
    line = b"HTTP/1.1 %d %s" % (status, reason or b"-")
    _STATUS_LINES[status] = (reason, line)
    return line


def proxy_response_head(
    response: ResponseHead, added: Headers, private: bool = False, connection: bytes | None = None
) -> bytes:
    """The head that forwards ``response`` to the client: the status line as HTTP/1.1 (a missing reason
    phrase as "-"); the end-to-end fields (:func:`end_to_end`); ``added`` (the body's new framing, the
    persistence cookie); when ``private``, Cache-Control as :func:`make_private` makes it; then Connection:
    ``connection`` when given.
    """
    headers = response.headers
    names = response.names
    first = response.first
    skip = HOP_BY_HOP
    if b"connection" in first and (named := _named_by_connection(names, first, headers)):
        skip = skip | named
    lines = [_status_line(response.status, response.reason)]
    cache_control = _PRIVATE_ONLY
    if private and b"cache-control" in first:
        directives = [
            directive
            for low, (_, value) in zip(names, headers, strict=True)
            if low == b"cache-control" and low not in skip
            for directive in _shared_cache_directives_removed(value)
        ]
        skip = skip | {b"cache-control"}
        cache_control = b"Cache-Control: " + _private_cache_control(directives)
    for i in range(len(names)):  # (by index: compiled, a zip makes a tuple per field)
        if names[i] not in skip:
            lines.append(b": ".join(headers[i]))
    for extra in added:
        lines.append(b": ".join(extra))
    if private:
        lines.append(cache_control)
    if connection is not None:
        lines.append(b"Connection: " + connection)
    lines.append(b"")
    lines.append(b"")
    return b"\r\n".join(lines)


# -- the balancer's own responses ----------------------------------------------------------------------------


def simple_response(
    status: int,
    body: bytes = b"",
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
    extra: Sequence[tuple[bytes, bytes]] = (),
    close: bool = True,
    head_only: bool = False,
) -> bytes:
    """A complete response from the balancer itself (an error page, a redirect, a maintenance page)."""
    if not body and status >= 400:
        body = f"{status} {REASONS.get(status, '')}\n".encode()
    headers: Headers = [
        (b"Content-Type", content_type),
        (b"Content-Length", str(len(body)).encode()),
        (b"Cache-Control", b"no-store"),
    ]
    headers += list(extra)
    if close:
        headers.append((b"Connection", b"close"))
    start = f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}".encode()
    return serialize_head(start, headers) + (b"" if head_only else body)
