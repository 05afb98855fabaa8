"""The PROXY protocol v2 header pacslb writes to nodes (pacslb/protocols/proxy.py), byte by byte as
HAProxy's specification (proxy-protocol.txt, 2.2) lays it out."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from pacslb.protocols.proxy import LOCAL_HEADER, SIGNATURE, proxy_header

SIG = bytes.fromhex("0D0A0D0A000D0A515549540A")


def test_the_signature_and_the_local_command() -> None:
    assert SIGNATURE == SIG
    assert SIG + bytes([0x20, 0x00, 0x00, 0x00]) == LOCAL_HEADER


def test_an_ipv4_client() -> None:
    header = proxy_header(("10.1.2.3", 40000), ("10.0.0.100", 104))
    assert header == SIG + bytes([0x21, 0x11, 0, 12, 10, 1, 2, 3, 10, 0, 0, 100]) + struct.pack(">HH", 40000, 104)


def test_an_ipv4_client_of_a_dual_stack_listener_is_told_as_ipv4() -> None:
    assert proxy_header(("::ffff:10.1.2.3", 5), ("::ffff:10.0.0.100", 80)) == proxy_header(
        ("10.1.2.3", 5), ("10.0.0.100", 80)
    )


@given(
    st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None),
    st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None),
    st.integers(0, 65535),
    st.integers(0, 65535),
)
def test_an_ipv6_client(
    source: ipaddress.IPv6Address, destination: ipaddress.IPv6Address, sport: int, dport: int
) -> None:
    header = proxy_header((str(source), sport), (str(destination), dport))
    assert header[:16] == SIG + bytes([0x21, 0x21, 0, 36])
    assert header[16:32] == source.packed and header[32:48] == destination.packed
    assert struct.unpack(">HH", header[48:]) == (sport, dport)
