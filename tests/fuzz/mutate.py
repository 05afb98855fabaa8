"""A seeded, structure-aware mutator: the same seed and seeds give the same inputs, in the same order.

Each input is a seed with 1 to 4 stacked mutations. Generic ones (any bytes): bit flips, interesting
bytes, insertions, deletions, truncation, duplication of a slice, splicing with another seed. DICOM ones
know the layout of PS3.8 9.3 (reference/dicom-ul.md): the PDU length, every item and sub-item length of an
A-ASSOCIATE-RQ, the PDU type, protocol version, AE title fields, presentation context IDs and item types.
HTTP ones know RFC 9112's lines: method, target, version, line endings, and header fields that matter to
framing and routing (Content-Length, Transfer-Encoding, Host, Connection, Expect, Upgrade), folding,
control characters, very long or very many fields.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

#: Inputs are capped: larger ones only test the size limits, which the unit tests cover.
MAX_INPUT = 20_000

INTERESTING_BYTES = bytes([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x20, 0x0D, 0x0A, 0x09, 0x5C, 0x22, 0x3A, 0x2C])
INTERESTING_32 = [0, 1, 3, 4, 67, 68, 69, 0x7FFF, 0xFFFF, 0x10000, 256 * 1024, 256 * 1024 + 1, 0x7FFFFFFF, 0xFFFFFFFF]
INTERESTING_16 = [0, 1, 2, 3, 4, 5, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF]


def _generic(rng: random.Random, data: bytearray, seeds: list[bytes]) -> None:
    op = rng.randrange(8)
    n = len(data)
    if op == 0 and n:  # flip a bit
        pos = rng.randrange(n)
        data[pos] ^= 1 << rng.randrange(8)
    elif op == 1 and n:  # an interesting byte
        data[rng.randrange(n)] = rng.choice(INTERESTING_BYTES)
    elif op == 2:  # insert random or interesting bytes
        pos = rng.randrange(n + 1)
        if rng.random() < 0.5:
            chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            chunk = bytes([rng.choice(INTERESTING_BYTES)]) * rng.randint(1, 4)
        data[pos:pos] = chunk
    elif op == 3 and n:  # delete a slice
        pos = rng.randrange(n)
        del data[pos : pos + rng.randint(1, 16)]
    elif op == 4 and n:  # truncate
        del data[rng.randrange(n) :]
    elif op == 5 and n:  # duplicate a slice
        pos = rng.randrange(n)
        chunk = data[pos : pos + rng.randint(1, 64)]
        at = rng.randrange(n + 1)
        data[at:at] = chunk
    elif op == 6 and seeds:  # splice: our head, another seed's tail
        other = rng.choice(seeds)
        if n and other:
            data[rng.randrange(n) :] = other[rng.randrange(len(other)) :]
    elif op == 7 and n:  # overwrite a slice with random bytes
        pos = rng.randrange(n)
        for i in range(pos, min(n, pos + rng.randint(1, 8))):
            data[i] = rng.randrange(256)


# ------------------------------------------------------------------------------------------------ DICOM


def _length_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every length field found by walking an A-ASSOCIATE-RQ leniently."""
    fields = [(2, 4)] if len(data) >= 6 else []

    def walk(start: int, end: int, depth: int) -> None:
        pos = start
        while pos + 4 <= end:
            fields.append((pos + 2, 2))
            kind = data[pos]
            length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            value_end = min(end, pos + 4 + length)
            if depth == 0 and kind == 0x20:
                walk(pos + 8, value_end, 1)
            elif depth == 0 and kind == 0x50:
                walk(pos + 4, value_end, 1)
            pos += 4 + length

    walk(74, len(data), 0)
    return fields


def _item_starts(data: bytes) -> list[int]:
    starts = []
    pos = 74
    while pos + 4 <= len(data):
        starts.append(pos)
        pos += 4 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return starts


def _dicom(rng: random.Random, data: bytearray, seeds: list[bytes]) -> None:
    op = rng.randrange(9)
    if op <= 2:  # a length field: a boundary value or off by a little
        fields = _length_fields(bytes(data))
        if not fields:
            return
        offset, width = rng.choice(fields)
        old = int.from_bytes(data[offset : offset + width], "big")
        if rng.random() < 0.5:
            new = old + rng.choice([-2, -1, 1, 2, 4, -4])
        else:
            new = rng.choice(INTERESTING_32 if width == 4 else INTERESTING_16)
        data[offset : offset + width] = (new % (1 << (8 * width))).to_bytes(width, "big")
    elif op == 3 and data:  # PDU type
        data[0] = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 0x41, 0x16, 0xFF])
    elif op == 4 and len(data) >= 8:  # protocol version
        data[6:8] = struct.pack(">H", rng.choice([0, 1, 2, 3, 0x8000, 0xFFFF]))
    elif op == 5 and len(data) >= 42:  # an AE title field
        at = rng.choice([10, 26])
        title = rng.choice(
            [b" " * 16, b"\\BACKSLASH", b"\x00" * 16, b"CT\x0901", b"\xe9T\xc3\xa9", b"A", b"X" * 16, b"  LEADING"]
        )
        data[at : at + 16] = title.ljust(16)[:16]
    elif op == 6:  # an item's type
        starts = _item_starts(bytes(data))
        if starts:
            data[rng.choice(starts)] = rng.choice([0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x55, 0x00, 0xFF])
    elif op == 7:  # a presentation context ID (byte 4 of a 0x20 item)
        starts = [s for s in _item_starts(bytes(data)) if data[s] == 0x20 and s + 4 < len(data)]
        if starts:
            data[rng.choice(starts) + 4] = rng.choice([0, 2, 255, 254, 1, 3])
    else:  # remove or repeat a whole item
        starts = _item_starts(bytes(data))
        if starts:
            s = rng.choice(starts)
            end = s + 4 + struct.unpack(">H", data[s + 2 : s + 4])[0]
            if rng.random() < 0.5:
                del data[s:end]
            else:
                data[end:end] = data[s:end] * rng.randint(1, 3)
            if len(data) >= 6 and rng.random() < 0.8:  # mostly keep the PDU length consistent
                data[2:6] = struct.pack(">I", len(data) - 6)


# ------------------------------------------------------------------------------------------------- HTTP

METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"TRACE", b"PATCH", b"PRI",
           b"get", b"G ET", b"", b"GET\x00", b"M-SEARCH", b"X" * 40, b"PROPFIND"]  # fmt: skip
TARGETS = [b"/", b"*", b"", b"//evil", b"http://other.example/x", b"/a b", b"/%00", b"/\x7f", b"/?q=\r",
           b"/" + b"a" * 9000, b"other.example:443", b"/#frag", b"/\xff\xfe"]  # fmt: skip
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b"HTTP/11",
            b"HTTP/3", b"", b"HTTP/1.1\x00"]  # fmt: skip
FIELDS = [
    b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: -1", b"Content-Length: 5, 5",
    b"Content-Length: 18446744073709551616", b"Content-Length: +5", b"Content-Length:  5 ", b"Content-Length: 0x10",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: chunked, gzip",
    b"Transfer-Encoding: identity", b"Transfer-Encoding: xchunked", b"Transfer-Encoding:\tchunked",
    b"Transfer-Encoding : chunked", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"Host: other.example", b"Host:", b"Host: a b", b"Host: [::1]:80", b"Host: exa\x00mple",
    b"Connection: close", b"Connection: keep-alive", b"Connection: upgrade", b"Connection: content-length",
    b"Connection: host", b"Connection: close, te", b"Upgrade: websocket", b"Upgrade: h2c", b"Expect: 100-continue",
    b"Expect: 200-ok", b"X-Forwarded-For: 10.0.0.1", b"Forwarded: for=evil", b"Cookie: SERVERID=pacs9",
    b" folded continuation", b"\tfolded", b"Bad Name: x", b"Bad\x00Name: x", b"X-Empty:", b": no name", b"NoColon",
    b"X-Ctl: a\x01b", b"X-Obs: caf\xe9", b"X-CR: a\rb", b"X-Long: " + b"v" * 70_000,
]  # fmt: skip


def _http(rng: random.Random, data: bytearray, seeds: list[bytes]) -> None:
    head_end = data.find(b"\r\n\r\n")
    head = bytes(data if head_end < 0 else data[:head_end])
    rest = b"" if head_end < 0 else bytes(data[head_end:])
    lines = head.split(b"\r\n")
    first = lines[0].split(b" ")
    op = rng.randrange(10)
    if op == 0 and first:
        first[0] = rng.choice(METHODS)
    elif op == 1 and len(first) >= 2:
        first[1] = rng.choice(TARGETS)
    elif op == 2 and first:
        first[-1] = rng.choice(VERSIONS)
    elif op in (3, 4):  # add a field somewhere in the head
        lines.insert(rng.randint(1, len(lines)), rng.choice(FIELDS))
    elif op == 5 and len(lines) > 1:  # drop or repeat a field
        i = rng.randrange(1, len(lines))
        if rng.random() < 0.5:
            del lines[i]
        else:
            lines.insert(i, lines[i])
    elif op == 6:  # line endings
        sep = rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n\r\n"])
        i = rng.randrange(len(lines))
        lines[i] = lines[i] + sep + (lines.pop(i + 1) if i + 1 < len(lines) else b"")
    elif op == 7:  # many fields
        lines[1:1] = [b"X-Many-%d: v" % i for i in range(rng.choice([99, 100, 101, 150]))]
    elif op == 8:  # a body after the head: chunked, possibly broken
        rest = rest[:4] + rng.choice(
            [b"5\r\nhello\r\n0\r\n\r\n", b"5\r\nhel", b"zz\r\n", b"0\r\nX-Trailer: t\r\n\r\n",
             b"5;ext=1\r\nhello\r\n0\r\n\r\n",
             b"ffffffffffffffffff\r\n", b"hello", b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"]
        )  # fmt: skip
    else:  # whitespace in the request line
        lines[0] = rng.choice([b" ", b"  ", b"\t", b""]).join(first)
        first = lines[0].split(b" ")
    if op != 9:
        lines[0] = b" ".join(first)
    data[:] = b"\r\n".join(lines) + rest


def mutator(kind: str) -> Callable[[random.Random, bytearray, list[bytes]], None]:
    structured = _dicom if kind == "dicom" else _http

    def mutate(rng: random.Random, data: bytearray, seeds: list[bytes]) -> None:
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
            (structured if rng.random() < 0.6 else _generic)(rng, data, seeds)

    return mutate


def stream(kind: str, seeds: list[bytes], seed: int, valid_share: float = 0.05) -> Callable[[], bytes]:
    """Like :func:`inputs`, one input per call, without holding them all."""
    rng = random.Random(f"{kind}:{seed}")
    mutate = mutator(kind)

    def next_input() -> bytes:
        data = bytearray(rng.choice(seeds))
        if rng.random() >= valid_share:
            mutate(rng, data, seeds)
        return bytes(data[:MAX_INPUT])

    return next_input
