"""The PROXY protocol, version 2: the client's address, told to a node ahead of the connection's bytes.

A node behind a balancer sees the balancer's address as its peer. With ``proxy_protocol: v2`` on a
service, pacslb writes one binary header first on each node connection (HAProxy's specification,
proxy-protocol.txt, section 2.2): the 12-byte signature, version 2 with the PROXY command, the family
(TCP over IPv4 or IPv6), the length of the addresses, then source address, destination address, source
port and destination port, in network order. The source is the client, the destination the address the
client connected to. A health check sends the LOCAL command instead (no addresses: the connection is the
balancer's own), which nodes accept without logging a broken header. Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY = 0x21  # version 2, command PROXY
_LOCAL = 0x20  # version 2, command LOCAL
_TCP4, _TCP6 = 0x11, 0x21

#: The header of a connection that carries no client (a health check).
LOCAL_HEADER = SIGNATURE + bytes([_LOCAL, 0]) + struct.pack(">H", 0)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack listener's IPv4 client is an IPv4 client
    return ip


def proxy_header(client: tuple[str, int], local: tuple[str, int]) -> bytes:
    """The header of a connection from ``client`` (address, port) to the service's ``local`` address."""
    source, destination = _ip(client[0]), _ip(local[0])
    if source.version != destination.version:  # cannot happen on one socket; say nothing rather than lie
        return LOCAL_HEADER
    family = _TCP4 if source.version == 4 else _TCP6
    addresses = source.packed + destination.packed + struct.pack(">HH", client[1], local[1])
    return SIGNATURE + bytes([_PROXY, family]) + struct.pack(">H", len(addresses)) + addresses
