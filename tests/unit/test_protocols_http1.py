"""protocols/http1.py without a network: framing of requests and responses, limits, errors, the header
rewrites of the proxy, cookies; plus the cookie codec, the per-request decision and the clock check.
Property tests feed the same messages cut at every possible place, as a network would deliver them."""

from __future__ import annotations

import email.utils
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacslb.balance.cookie import CookieCodec, choose_with_cookie, cookie_value
from pacslb.balance.persistence import PersistenceTable
from pacslb.balance.roundrobin import RoundRobin
from pacslb.balance.server import ServerState
from pacslb.checks.http import clock_skew
from pacslb.protocols.http1 import (
    END,
    MAX_TRAILERS,
    CookieAttributes,
    CookieMemo,
    EndOfMessage,
    Event,
    Forwarding,
    Framing,
    HttpProtocolError,
    RequestHead,
    RequestReader,
    RequestRewrite,
    ResponseHead,
    ResponseReader,
    Upgrade,
    chunk,
    cookie_values,
    end_to_end,
    forwarding_headers,
    last_chunk,
    make_private,
    proxy_request_head,
    proxy_response_head,
    remove_cookie,
    request_cookie_values,
    serialize_head,
    set_cookie,
    simple_response,
)


def events(reader: RequestReader | ResponseReader, *pieces: bytes) -> list[Event]:
    for piece in pieces:
        reader.feed(piece)
    out = []
    while (event := reader.take()) is not None:
        out.append(event)
    return out


def merged(evs: list[Event]) -> list[Event]:
    """Consecutive body pieces joined (how a body is cut depends on how the bytes arrived)."""
    out: list[Event] = []
    for event in evs:
        if type(event) is bytes and out and type(out[-1]) is bytes:
            out[-1] = out[-1] + event
        else:
            out.append(event)
    return out


# -- requests ----------------------------------------------------------------------------------------------

PIPELINE = (
    b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nCookie: SERVERID=abc; o=1\r\n\r\n"
    b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 9\r\n\r\n"
    b"GET /d HTTP/1.0\r\n\r\n"
)


def check_pipeline(evs: list[Event]) -> None:
    evs = merged(evs)
    heads = [e for e in evs if isinstance(e, RequestHead)]
    assert [(h.method, h.target, h.framing) for h in heads] == [
        (b"GET", b"/a?x=1", Framing.NONE),
        (b"POST", b"/b", Framing.LENGTH),
        (b"PUT", b"/c", Framing.CHUNKED),
        (b"GET", b"/d", Framing.NONE),
    ]
    assert heads[0].path == "/a" and heads[0].header(b"cookie") == b"SERVERID=abc; o=1"
    assert heads[1].content_length == 5
    assert [h.version for h in heads] == ["1.1", "1.1", "1.1", "1.0"]
    assert [h.keep_alive for h in heads] == [True, True, True, False]
    assert [e for e in evs if type(e) is bytes] == [b"hello", b"abcde"]
    ends = [e for e in evs if isinstance(e, EndOfMessage)]
    assert len(ends) == 4 and ends[2].trailers == [(b"X-Sum", b"9")]


def test_pipelined_requests_of_every_framing() -> None:
    check_pipeline(events(RequestReader(), PIPELINE))


@given(st.lists(st.integers(min_value=1, max_value=len(PIPELINE) - 1), max_size=12))
def test_pipelined_requests_cut_anywhere(cuts: list[int]) -> None:
    points = [0, *sorted(set(cuts)), len(PIPELINE)]
    reader = RequestReader()
    check_pipeline(events(reader, *(PIPELINE[a:b] for a, b in itertools.pairwise(points))))


@given(st.binary(min_size=0, max_size=3000), st.integers(min_value=1, max_value=700))
def test_chunked_bodies_arrive_whole(body: bytes, cut: int) -> None:
    encoded = b"".join(chunk(body[i : i + 1000]) for i in range(0, len(body), 1000)) + last_chunk()
    raw = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + encoded
    evs = events(RequestReader(), *(raw[i : i + cut] for i in range(0, len(raw), cut)))
    assert b"".join(e for e in evs if type(e) is bytes) == body
    assert isinstance(evs[-1], EndOfMessage)


def test_expect_continue_and_upgrade() -> None:
    (head, *_) = events(
        RequestReader(), b"PUT /u HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    assert isinstance(head, RequestHead) and head.expect_continue
    evs = events(
        RequestReader(), b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nFRAME"
    )
    assert isinstance(evs[0], RequestHead) and evs[0].upgrade
    assert evs[1] is END and evs[2] == Upgrade(b"FRAME")
    reader = RequestReader()
    events(reader, b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    reader.feed(b"MORE")
    assert bytes(reader.after_upgrade) == b"MORE"


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "without Host"),
        (b"GET / HTTP/1.1\nHost: h\n\n", 400, "malformed"),  # bare LF: no lenient parsing (smuggling)
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "malformed"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "malformed"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 5000 + b"\r\n\r\n", 431, "larger than"),
        (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: 1\r\n" * 20 + b"\r\n", 431, "more than"),
        # Smuggling: a proxy that removed a field the client names in Connection would forward the body as
        # the start of the next request (Content-Length) or a request without its site (Host).
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Content-Length\r\nContent-Length: 1\r\n\r\n",
            400,
            "Connection names content-length",
        ),
        (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Host\r\n\r\n", 400, "Connection names host"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\nConnection: HOST\r\n\r\n", 400, "names host"),
        # A coding before chunked would reach the node undone (RFC 9112 6.1: 501).
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, "'gzip'"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", 501, "gzip"),
        (b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "HTTP/1.0"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "invalid Host"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, "invalid Host"),
        (b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", 400, "invalid Host"),
    ],
)
def test_bad_requests_get_the_right_status(raw: bytes, status: int, reason: str) -> None:
    with pytest.raises(HttpProtocolError, match=reason) as caught:
        events(RequestReader(max_head_size=4096, max_headers=16), raw)
    assert caught.value.status == status


def test_an_incomplete_head_is_bounded_while_it_arrives() -> None:
    reader = RequestReader(max_head_size=4096)
    reader.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX: ")
    with pytest.raises(HttpProtocolError) as caught:
        for _ in range(10):
            reader.feed(b"a" * 1000)  # never a complete field: httptools would hold it all
    assert caught.value.status == 431


def test_a_head_over_the_limit_is_refused_however_its_reads_fall() -> None:
    """The read a head began in counts too: a head over the limit that arrived in two reads, neither wholly
    head, was let through before."""
    big = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"x" * 5000 + b"\r\n\r\n"
    small = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"x" * 4000 + b"\r\n\r\n"
    for cut in (10, 1000, 2500, 4096, 5000):
        with pytest.raises(HttpProtocolError, match="larger than") as caught:
            events(RequestReader(max_head_size=4096), big[:cut], big[cut:])
        assert caught.value.status == 431
        evs = events(RequestReader(max_head_size=4096), small[: min(cut, 3000)], small[min(cut, 3000) :])
        assert isinstance(evs[0], RequestHead)
    pipelined = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 500 + small  # 19 KB of requests before it
    evs = events(RequestReader(max_head_size=4096), pipelined[:-100], pipelined[-100:])
    assert len([e for e in evs if isinstance(e, RequestHead)]) == 501


def test_too_many_fields_are_refused_while_the_head_still_arrives() -> None:
    """A head of many small fields that never completes is refused by count, read by read, before its size
    limit (the fields are held one by one, each costing more than its bytes)."""
    reader = RequestReader(max_head_size=64 * 1024, max_headers=16)
    reader.feed(b"GET / HTTP/1.1\r\nHost: h\r\n")
    with pytest.raises(HttpProtocolError, match="more than 16") as caught:
        for _ in range(5):
            reader.feed(b"X: 1\r\n" * 6)
    assert caught.value.status == 431
    response = ResponseReader(b"GET", max_headers=16)
    with pytest.raises(HttpProtocolError, match="more than 16") as caught:
        response.feed(b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 18)  # a field is passed on when the next begins
    assert caught.value.status == 502


def test_trailer_fields_past_the_bound_are_dropped_not_refused() -> None:
    """The first MAX_TRAILERS trailer fields are kept, whether the trailers come in one read or in many."""
    trailers = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(MAX_TRAILERS + 10))
    stream = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n" + trailers + b"\r\n"
    for size in (len(stream), 9):
        evs = events(RequestReader(), *[stream[i : i + size] for i in range(0, len(stream), size)])
        end = evs[-1]
        assert isinstance(end, EndOfMessage)
        assert end.trailers == [(b"X-%d" % i, b"%d" % i) for i in range(MAX_TRAILERS)]


def test_the_head_limit_is_per_head_not_per_read() -> None:
    """A read larger than the limit that carries many small pipelined heads (or a small head and its
    body) is fine: only a head's own size counts."""
    reader = RequestReader(max_head_size=4096)
    pipelined = b"GET /x HTTP/1.1\r\nHost: h\r\nX-Pad: %s\r\n\r\n" % (b"p" * 100) * 100
    evs = events(reader, pipelined + b"PUT /u HTTP/1.1\r\nHost: h\r\nContent-Length: 9000\r\n\r\n" + b"b" * 9000)
    assert len([e for e in evs if isinstance(e, RequestHead)]) == 101 and len(pipelined) > 4096
    with pytest.raises(HttpProtocolError, match="larger than") as caught:
        events(RequestReader(max_head_size=4096), b"GET / HTTP/1.1\r\nHost: h\r\n", *[b"X: %s\r\n" % (b"a" * 90)] * 50)
    assert caught.value.status == 431


def test_a_read_that_completes_a_split_head_is_not_all_head() -> None:
    """A read that continues an incomplete head and completes it may carry many pipelined requests or a
    body besides: only the head's own bytes count (a pipelining client used to get a 431 whenever one
    read ended inside a head and the next was larger than the limit)."""
    request = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
    stream = request * 400  # 12 KB, three times the limit
    evs = events(RequestReader(max_head_size=4096), stream[:1000], stream[1000:])
    assert len([e for e in evs if isinstance(e, RequestHead)]) == 400
    upload = b"PUT /u HTTP/1.1\r\nHost: h\r\nContent-Length: 20000\r\n\r\n" + b"b" * 20000
    evs = events(RequestReader(max_head_size=4096), upload[:20], upload[20:])
    assert sum(len(e) for e in evs if isinstance(e, bytes)) == 20000


def test_a_head_under_the_limit_in_several_reads_is_accepted() -> None:
    """A head is measured once, exactly, when it completes (its reads are not added to its fields)."""
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: %s\r\n" % (b"a" * 3850) + b"\r\n"
    assert len(head) < 4096
    evs = events(RequestReader(max_head_size=4096), head[:10], head[10:3000], head[3000:])
    assert isinstance(evs[0], RequestHead)


def test_endless_trailer_fields_are_bounded_while_they_arrive() -> None:
    """After the last chunk, httptools holds a trailer field until its end: a client sending one without end
    gets 431 (a node, 502) once the limit is passed, as for a head, instead of growing pacslb's memory."""
    reader = RequestReader(max_head_size=4096)
    reader.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: ")
    with pytest.raises(HttpProtocolError, match="trailer fields larger than") as caught:
        for _ in range(10):
            reader.feed(b"a" * 1000)
    assert caught.value.status == 431
    response = ResponseReader(b"GET", max_head_size=4096)
    response.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: ")
    with pytest.raises(HttpProtocolError) as caught:
        for _ in range(10):
            response.feed(b"a" * 1000)
    assert caught.value.status == 502


def test_chunked_bodies_in_small_reads_are_not_mistaken_for_trailers() -> None:
    """Chunk headers and chunk data in reads of any size, and trailers in several reads, stay fine."""
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [b"x" * 3000] * 10)
    stream = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\nX-T: 1\r\n\r\n"
    for size in (1, 7, 1000):
        evs = events(RequestReader(max_head_size=4096), *[stream[i : i + size] for i in range(0, len(stream), size)])
        assert sum(len(e) for e in evs if isinstance(e, bytes)) == 30000
        end = evs[-1]
        assert isinstance(end, EndOfMessage) and end.trailers == [(b"X-T", b"1")]


def test_client_closing_mid_request_is_an_error_between_requests_it_is_not() -> None:
    reader = RequestReader()
    events(reader, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    reader.eof()
    reader.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\nabc")
    with pytest.raises(HttpProtocolError):
        reader.eof()


# -- responses ---------------------------------------------------------------------------------------------


def test_response_framings() -> None:
    evs = events(ResponseReader(b"GET"), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(evs[0], ResponseHead) and evs[0].framing is Framing.LENGTH and evs[0].keep_alive
    assert evs[1:] == [b"ok", END]
    evs = events(ResponseReader(b"GET"), b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert isinstance(evs[0], ResponseHead) and evs[0].framing is Framing.CHUNKED
    # No length: the body runs to the close, and the connection cannot be kept.
    reader = ResponseReader(b"GET")
    evs = events(reader, b"HTTP/1.1 200 OK\r\n\r\nsome")
    assert isinstance(evs[0], ResponseHead) and evs[0].framing is Framing.CLOSE and not evs[0].keep_alive
    reader.eof()
    assert events(reader) == [END]


def test_head_204_304_have_no_body_and_extra_bytes_spoil_the_connection() -> None:
    reader = ResponseReader(b"HEAD")
    evs = events(reader, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert isinstance(evs[0], ResponseHead) and evs[0].framing is Framing.NONE and evs[1:] == [END]
    assert reader.finished and not reader.extra
    reader.feed(b"junk")
    assert reader.extra
    for status in (204, 304):
        evs = events(ResponseReader(b"GET"), b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
        assert evs[1:] == [END]


def test_interim_responses_then_the_final_one() -> None:
    evs = events(
        ResponseReader(b"POST"),
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    )
    heads = [e for e in evs if isinstance(e, ResponseHead)]
    assert [(h.status, h.informational) for h in heads] == [(100, True), (103, True), (201, False)]
    assert heads[1].reason == b"Early Hints" and evs[-1] is END


def test_switching_protocols() -> None:
    evs = events(
        ResponseReader(b"GET", upgrade_requested=True),
        b"HTTP/1.1 101 Switching\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\nxy",
    )
    assert isinstance(evs[0], ResponseHead) and evs[0].status == 101 and evs[1] == Upgrade(b"xy")
    for requested, raw in (
        (False, b"HTTP/1.1 101 Switching\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\n"),
        (True, b"HTTP/1.1 101 Switching\r\nUpgrade: ws\r\n\r\n"),  # RFC 9110 7.8: Connection: upgrade too
    ):
        with pytest.raises(HttpProtocolError) as caught:
            events(ResponseReader(b"GET", upgrade_requested=requested), raw)
        assert caught.value.status == 502


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",
        b"HTTP/1.1 100 Go\r\n\r\n",
    ],
)
def test_node_closing_early_is_a_502(raw: bytes) -> None:
    reader = ResponseReader(b"GET")
    events(reader, raw)
    with pytest.raises(HttpProtocolError) as caught:
        reader.eof()
    assert caught.value.status == 502


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\nabc", "names content-length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "not passed on"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", "not passed on"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", "not passed on"),
        (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "HTTP/1.0"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "malformed"),
    ],
)
def test_responses_whose_framing_a_proxy_would_change_are_a_502(raw: bytes, reason: str) -> None:
    with pytest.raises(HttpProtocolError, match=reason) as caught:
        events(ResponseReader(b"GET"), raw)
    assert caught.value.status == 502


def test_malformed_response_is_a_502() -> None:
    with pytest.raises(HttpProtocolError) as caught:
        events(ResponseReader(b"GET"), b"NOTHTTP\r\n\r\n")
    assert caught.value.status == 502


# -- header rewrites ---------------------------------------------------------------------------------------


def test_hop_by_hop_fields_are_not_forwarded() -> None:
    headers = [
        (b"Host", b"h"),
        (b"Connection", b"keep-alive, X-Private"),
        (b"X-Private", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Accept", b"*/*"),
    ]
    assert end_to_end(headers) == [(b"Host", b"h"), (b"Accept", b"*/*")]
    assert end_to_end(headers, frozenset({b"accept"})) == [(b"Host", b"h")]


def test_forwarding_fields() -> None:
    headers = [(b"Host", b"pacs.example"), (b"X-Forwarded-For", b"10.0.0.1"), (b"X-Forwarded-Proto", b"https")]
    kept, added = forwarding_headers(headers, "10.1.2.3", "http", Forwarding(forwarded=True))
    assert kept == [(b"Host", b"pacs.example")]
    assert dict(added) == {
        b"X-Forwarded-For": b"10.0.0.1, 10.1.2.3",
        b"X-Forwarded-Proto": b"http",
        b"X-Forwarded-Host": b"pacs.example",
        b"Forwarded": b'for=10.1.2.3;proto=http;host="pacs.example"',
    }
    _, added = forwarding_headers([], "fd00::5", "https", Forwarding(False, False, False, True))
    assert added == [(b"Forwarded", b'for="[fd00::5]";proto=https')]


def test_cookies() -> None:
    headers = [(b"Cookie", b"a=1; SERVERID=xyz; b=2"), (b"Cookie", b'SERVERID="q"'), (b"Accept", b"*/*")]
    assert cookie_values(headers, b"SERVERID") == [b"xyz", b"q"]
    assert remove_cookie(headers, b"SERVERID") == [(b"Cookie", b"a=1; b=2"), (b"Accept", b"*/*")]
    assert cookie_values([(b"Cookie", b"XSERVERID=1")], b"SERVERID") == []
    attributes = CookieAttributes(max_age=60, secure=True, domain="pacs.example")
    assert set_cookie("SERVERID", "v", attributes) == (
        b"SERVERID=v; Path=/; Domain=pacs.example; Max-Age=60; HttpOnly; Secure; SameSite=Lax"
    )
    assert make_private([(b"Cache-Control", b"public, max-age=60, s-maxage=600")]) == [
        (b"Cache-Control", b"max-age=60, private")
    ]
    assert make_private([]) == [(b"Cache-Control", b"private")]


_COOKIE_PAIRS = st.lists(
    st.sampled_from([b"SERVERID=xyz", b'SERVERID="q"', b"a=1", b"XSERVERID=2", b"SERVERID", b"", b" b = 3 "]),
    max_size=4,
)


_FIELDS = st.lists(
    st.one_of(
        _COOKIE_PAIRS.map(lambda pairs: (b"Cookie", b";".join(pairs))),
        st.sampled_from([(b"Accept", b"*/*"), (b"cookie", b"SERVERID=low"), (b"X-A", b"1")]),
    ),
    max_size=5,
)


def _parsed(fields: list[tuple[bytes, bytes]]) -> RequestHead:
    raw = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in fields) + b"\r\n"
    (head, _end) = events(RequestReader(), raw)
    assert isinstance(head, RequestHead)
    return head


@given(st.lists(_FIELDS, min_size=1, max_size=4))
def test_a_connections_cookie_memo_changes_nothing(requests: list[list[tuple[bytes, bytes]]]) -> None:
    """Requests in turn on one connection (its memo kept across them): the persistence cookie's values and
    the forwarded heads are those worked out without a memo, whatever the Cookie fields of each."""
    memo = CookieMemo()
    rewrite = RequestRewrite(Forwarding(), "http", b"SERVERID")
    for fields in requests:
        head = _parsed(fields)
        assert request_cookie_values(head, b"SERVERID", memo) == request_cookie_values(head, b"SERVERID")
        forwarded = proxy_request_head(head, "10.1.2.3", rewrite, b"", memo)
        assert forwarded == proxy_request_head(head, "10.1.2.3", rewrite, b"")


@given(st.lists(_FIELDS, min_size=1, max_size=5))
def test_heads_of_one_connection_have_their_own_names(requests: list[list[tuple[bytes, bytes]]]) -> None:
    """A reader gives a head the names of the head before it when they are the same, as received: every head
    of a connection still has its names lowered, and where each first comes, whatever came before."""
    reader = RequestReader()
    for fields in requests:
        raw = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in fields) + b"\r\n"
        (head, _end) = events(reader, raw)
        assert isinstance(head, RequestHead)
        lowered_names = [name.lower() for name, _ in head.headers]
        assert head.names == lowered_names
        assert head.first == {name: lowered_names.index(name) for name in lowered_names}


@given(_FIELDS)
def test_cookies_of_a_parsed_request_are_those_of_its_fields(fields: list[tuple[bytes, bytes]]) -> None:
    """Found with the head's lowered names (one Cookie field, several, none; other names repeated or not),
    the persistence cookie's values are those a scan of the fields finds, and every field loses it alike."""
    head = _parsed(fields)
    assert request_cookie_values(head, b"SERVERID") == cookie_values(head.headers, b"SERVERID")
    for _name, value in head.headers:
        pairs = [p.strip() for p in value.split(b";")]
        kept = b"; ".join([p for p in pairs if p and p.partition(b"=")[0].strip() != b"SERVERID"])
        expected = [(b"Cookie", kept)] if kept else []
        if b"SERVERID" not in value:
            expected = [(b"Cookie", value)]  # not rewritten at all
        assert remove_cookie([(b"Cookie", value)], b"SERVERID") == expected
    assert make_private([(b"Cache-Control", b"no-store")]) == [(b"Cache-Control", b"no-store")]


def test_simple_responses() -> None:
    answer = simple_response(503, extra=[(b"Retry-After", b"30")])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Retry-After: 30" in head and b"Connection: close" in head
    assert b"Content-Length: %d" % len(body) in head
    assert simple_response(503, head_only=True).endswith(b"\r\n\r\n")


# -- the one-pass heads the proxy sends: the same bytes as the rules composed ------------------------------

# Field names and values chosen to hit every rule: hop-by-hop fields, fields named by Connection (and a
# Connection naming Host or X-Forwarded-For), Expect, the persistence cookie alone or with others, earlier
# proxies' forwarding fields, Cache-Control directives a shared cache reads, a Host needing escapes.
FIELD_NAMES = [
    b"Host", b"host", b"Connection", b"connection", b"Keep-Alive", b"TE", b"Upgrade", b"Transfer-Encoding",
    b"Expect", b"Cookie", b"cookie", b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Forwarded-Host",
    b"Forwarded", b"X-Private", b"Accept", b"Cache-Control", b"Close",
]  # fmt: skip
FIELD_VALUES = [
    b"h", b"", b"keep-alive", b"Keep-Alive", b"close", b"X-Private, keep-alive", b"host", b"x-forwarded-for",
    b"SERVERID=v", b"SERVERID=v; a=1", b"a=1", b'SERVERID="q"; SERVERID=w', b"10.0.0.1", b"https",
    b"public, max-age=60, s-maxage=600", b"no-store", b"Private", b"100-continue", b"websocket",
    b'pacs "main" \\ host',
]  # fmt: skip
fields = st.lists(st.tuples(st.sampled_from(FIELD_NAMES), st.sampled_from(FIELD_VALUES)), max_size=12)


def reference_request_head(
    head: RequestHead, ip: str, forwarding: Forwarding, proto: str, strip: bytes | None, host: bytes
) -> bytes:
    """What the proxy sent before the one-pass builder: the rules, one after the other."""
    headers = end_to_end(head.headers, frozenset({b"expect"}))
    if strip is not None:
        headers = remove_cookie(headers, strip)
    headers, added = forwarding_headers(headers, ip, proto, forwarding)
    headers += added
    if head.version == "1.0" and head.header(b"host") is None:
        headers.append((b"Host", host))
    if head.framing is Framing.CHUNKED:
        headers.append((b"Transfer-Encoding", b"chunked"))
    if head.upgrade:
        headers += [(b"Connection", b"Upgrade"), (b"Upgrade", head.header(b"upgrade") or b"")]
    return serialize_head(b"%s %s HTTP/1.1" % (head.method, head.target), headers)


@given(
    fields,
    st.sampled_from(["1.0", "1.1"]),
    st.sampled_from([Framing.NONE, Framing.LENGTH, Framing.CHUNKED]),
    st.booleans(),
    st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    st.sampled_from(["10.1.2.3", "fd00::5"]),
    st.sampled_from([None, b"SERVERID"]),
)
def test_request_head_in_one_pass_is_the_rules_composed(
    headers: list[tuple[bytes, bytes]],
    version: str,
    framing: Framing,
    upgrade: bool,
    options: tuple[bool, bool, bool, bool],
    ip: str,
    strip: bytes | None,
) -> None:
    head = RequestHead(
        b"GET", b"/a?b", version, headers, True, upgrade, framing, None, False, [k.lower() for k, _ in headers]
    )
    forwarding = Forwarding(*options)
    for proto in ("http", "https"):
        expected = reference_request_head(head, ip, forwarding, proto, strip, b"10.0.0.9:80")
        got = proxy_request_head(head, ip, RequestRewrite(forwarding, proto, strip), b"10.0.0.9:80")
        assert got == expected


@given(
    fields,
    st.sampled_from([b"OK", b""]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, b"close", b"keep-alive"]),
)
def test_response_head_in_one_pass_is_the_rules_composed(
    headers: list[tuple[bytes, bytes]], reason: bytes, cookie: bool, private: bool, connection: bytes | None
) -> None:
    response = ResponseHead(200, reason, headers, True, Framing.LENGTH, 5, [k.lower() for k, _ in headers])
    added = [(b"Transfer-Encoding", b"chunked")] + ([(b"Set-Cookie", b"SERVERID=v; Path=/")] if cookie else [])
    out = end_to_end(headers) + added
    if private:
        out = make_private(out)
    if connection is not None:
        out.append((b"Connection", connection))
    expected = serialize_head(b"HTTP/1.1 200 %s" % (reason or b"-"), out)
    assert proxy_response_head(response, added, private, connection) == expected


def test_reader_reused_for_the_next_response_on_a_connection() -> None:
    """A node connection keeps its reader: after a response to GET (parser ready for the next message) and
    after one to HEAD (its parser still expects the announced body, so it is replaced)."""
    reader = ResponseReader(b"GET")
    for method, raw, body in [
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", [b"ok"]),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", []),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", [b"abc"]),
        (b"POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", []),
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", [b"x"]),
    ]:
        reader.next_response(method)
        evs = events(reader, raw)
        final = [e for e in evs if isinstance(e, ResponseHead)][-1]
        assert final.status in (200, 204) and [e for e in evs if type(e) is bytes] == body
        assert evs[-1] is END and reader.finished and not reader.extra and reader.body_bytes == 0


def test_the_rest_of_a_complete_response_in_one_take() -> None:
    reader = ResponseReader(b"GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert isinstance(reader.take(), ResponseHead)
    assert reader.take_rest() is None  # still arriving: nothing taken
    reader.feed(b"2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n")
    assert reader.take_rest() == [b"abc", b"de", EndOfMessage([(b"X-Sum", b"5")])]
    assert reader.body_bytes == 0 and reader.take() is None


# -- the cookie's value, the decision, the clock -----------------------------------------------------------


def test_cookie_values_are_opaque_stable_and_distinct() -> None:
    codec = CookieCodec("web", ["pacs1", "pacs2"], None)
    v1, v2 = codec.value("pacs1"), codec.value("pacs2")
    assert v1 != v2 and len(v1) == 16 and "pacs" not in v1
    assert CookieCodec("web", ["pacs1"], None).value("pacs1") == v1  # same on another balancer
    assert cookie_value("other", "pacs1", None) != v1  # per service
    assert cookie_value("web", "pacs1", "a secret") != v1  # per secret
    assert codec.node(v1.encode()) == "pacs1" and codec.node(b"forged") is None


def servers() -> list[ServerState]:
    return [ServerState("pacs1", "10.0.0.1", 80), ServerState("pacs2", "10.0.0.2", 80)]


def test_decision_order_cookie_then_source_ip_then_scheduler() -> None:
    pool = servers()
    codec = CookieCodec("web", [s.name for s in pool], None)
    table = PersistenceTable(60, 100)
    table.acquire("10.9.9.9", "pacs1", 0)
    table.release("10.9.9.9", "pacs1", 0)
    cookie2 = [codec.value("pacs2").encode()]
    pick = choose_with_cookie(pool, RoundRobin(), table, "10.9.9.9", cookie2, codec, 1)
    assert pick == (pool[1], "cookie")
    assert choose_with_cookie(pool, RoundRobin(), table, "10.9.9.9", [b"junk"], codec, 1) == (pool[0], "source_ip")
    assert choose_with_cookie(pool, RoundRobin(), None, None, [], codec, 1)[1] == "balance"  # type: ignore[index]
    # A drained node keeps its cookie clients; a halted or down one does not.
    pool[1].admin = "drain"
    assert choose_with_cookie(pool, RoundRobin(), None, None, cookie2, codec, 1) == (pool[1], "cookie")
    for admin, health in (("halt", "up"), ("online", "down")):
        pool[1].admin, pool[1].health = admin, health  # type: ignore[assignment]
        assert choose_with_cookie(pool, RoundRobin(), None, None, cookie2, codec, 1) == (pool[0], "balance")
    # A node already tried for this request is not chosen again, even by its cookie.
    pool[1].admin, pool[1].health = "online", "up"
    assert choose_with_cookie(pool, RoundRobin(), None, None, cookie2, codec, 1, [pool[1]]) == (pool[0], "balance")


def test_clock_skew_from_the_date_header() -> None:
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert clock_skew(date, now) == pytest.approx(30.5)
    assert clock_skew(email.utils.formatdate(now - 10, usegmt=True), now) == pytest.approx(-9.5)
    assert clock_skew(None, now) is None and clock_skew("yesterday", now) is None


# -- the http section of the config ------------------------------------------------------------------------


def http_config(extra: str, mode: str = "http", persistence: str = "cookie+source_ip") -> str:
    return (
        "services:\n  web:\n    listen: 127.0.0.1:8080\n"
        f"    mode: {mode}\n    persistence: {{type: {persistence}}}\n"
        "    servers: {pacs1: 10.0.0.1:80}\n" + extra
    )


def config_issues(text: str) -> dict[str, str]:
    from pacslb.config import load_config_text
    from pacslb.errors import ConfigError

    try:
        load_config_text(text)
    except ConfigError as exc:
        return {issue.field: issue.reason for issue in exc.issues}
    return {}


def test_http_section_defaults_and_errors(tmp_path: object) -> None:
    from pacslb.config import load_config_text

    service = load_config_text(http_config("")).services["web"]
    assert service.mode == "http" and service.http is None  # every default applies
    service = load_config_text(
        http_config("    http:\n      cookie: {secure: always, max_age: 1h}\n      timeouts: {server: 30s}\n")
    ).services["web"]
    assert service.http is not None
    assert (service.http.cookie.secure, service.http.cookie.max_age, service.http.timeouts.server) == (
        "always",
        3600.0,
        30.0,
    )
    assert config_issues(http_config("    http: {}\n", mode="tcp", persistence="source_ip")) == {
        "services.web.http": "only applies to mode http (this service is tcp)"
    }
    assert "services.web.http.cookie" in config_issues(
        http_config("    http: {cookie: {indirect: false}}\n", persistence="source_ip")
    )
    assert (
        "cannot read file"
        in config_issues(http_config("    http: {maintenance_page: /nonexistent.html}\n"))[
            "services.web.http.maintenance_page"
        ]
    )
    assert "services.web.http.tls.certificate" in config_issues(
        http_config("    http: {tls: {certificate: /nonexistent.pem, key: /nonexistent.key}}\n")
    )
    assert "services.web.http.limits.max_head_size" in config_issues(
        http_config("    http: {limits: {max_head_size: 10}}\n")
    )


def test_field_names_are_lowered_through_a_bounded_cache() -> None:
    """Names are looked up lowered rather than lowered one by one; names past the bound are still lowered,
    only not remembered (a client making up names cannot grow the cache)."""
    from pacslb.protocols import http1

    made_up = [b"X-Made-Up-%d" % i for i in range(http1.MAX_LOWERED + 10)]
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"%s: v\r\n" % name for name in made_up[:50]) + b"\r\n"
    evs = events(RequestReader(max_headers=100), head)
    assert isinstance(evs[0], RequestHead)
    assert evs[0].names == [b"host"] + [name.lower() for name in made_up[:50]]
    assert [http1.lowered(name) for name in made_up] == [name.lower() for name in made_up]
    assert len(http1._LOWERED) == http1.MAX_LOWERED


@pytest.mark.parametrize(
    "after",
    [
        b"smuggled",  # not a message at all
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",  # a whole second response, without a body
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
    ],
)
def test_bytes_after_the_final_response_in_the_same_read_make_the_connection_unusable(after: bytes) -> None:
    """What a node sends past its response (a 204's body, a glued second response) is never an event and
    never an error for the response that came before it; the connection is not reused."""
    reader = ResponseReader(b"GET")
    evs = events(reader, b"HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n\r\n" + after)
    assert [type(e) for e in evs] == [ResponseHead, EndOfMessage]
    assert isinstance(evs[0], ResponseHead) and evs[0].status == 204
    assert reader.finished and reader.extra


@given(st.from_regex(rb"\A[0-9]{1,25}\Z"), st.from_regex(rb"\A[0-9]{1,6}\Z"))
def test_content_length_values_convert_as_int_does(digits: bytes, first: bytes) -> None:
    """Digits alone (added up in a loop up to 18 of them, given to int() beyond) convert as int() does; a
    list of values converts to its first; anything else is refused."""
    from pacslb.protocols.http1 import _content_length

    assert _content_length(digits) == int(digits)
    assert _content_length(first + b", " + first) == int(first)
    assert _content_length(b" " + first) == int(first)
    for bad in (b"", b"-", b"1a", b"x, 1"):
        with pytest.raises(HttpProtocolError):
            _content_length(bad)
