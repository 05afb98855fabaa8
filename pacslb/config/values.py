"""Parsing of the config's scalar value types: durations, rates, host:port addresses, netmasks, AE titles.

Each parser takes what YAML produced and returns a plain Python value or raises ``ValueError`` with a
message meant for the person editing the file (pydantic turns it into a located config error).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Parse ``500ms``, ``2s``, ``30m``, ``12h``, ``1d`` or a combination such as ``1h30m`` into seconds.

    A bare number is refused: HAProxy reads it as milliseconds, other tools as seconds, and a config
    that means one and says the other takes a PACS offline.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"a duration needs a unit, e.g. '2s' or '500ms' (got {value!r})")
    text = value.strip()
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(text):
        raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 2s, 30m, 12h, 1h30m)")
    return total


def format_duration(seconds: float) -> str:
    """The shortest config spelling of ``seconds`` (inverse of :func:`parse_duration` for whole units)."""
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*/\s*(s|m|h)")


def parse_rate(value: Any) -> float:
    """Parse a rate such as ``100/s``, ``600/m`` or ``3600/h`` into events per second.

    Like a duration, a rate needs its unit: a bare ``100`` could mean per second or per minute.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"a rate needs a unit, e.g. '100/s' or '600/m' (got {value!r})")
    match = _RATE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"not a rate: {value!r} (use e.g. 100/s, 600/m, 3600/h)")
    rate = float(match.group(1)) / _UNIT_SECONDS[match.group(2)]
    if rate <= 0:
        raise ValueError(f"a rate must be above 0 (got {value!r})")
    return rate


def format_rate(per_second: float) -> str:
    """The config spelling of a rate in events per second (inverse of :func:`parse_rate`)."""
    if per_second == int(per_second):
        return f"{int(per_second)}/s"
    for unit in ("m", "h"):
        count = per_second * _UNIT_SECONDS[unit]
        if abs(count - round(count)) < 1e-9:
            return f"{round(count)}/{unit}"
    return f"{per_second:g}/s"


@dataclass(frozen=True, slots=True)
class HostPort:
    """An IP address and a TCP port. Host names are not accepted: a balancer must not depend on DNS."""

    host: str
    port: int

    @property
    def family_v6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family_v6 else f"{self.host}:{self.port}"


def parse_host_port(value: Any) -> HostPort:
    """Parse ``10.0.0.11:104`` or ``[fd00::11]:104``."""
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected 'address:port', e.g. '10.0.0.11:104' (got {value!r})")
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected 'address:port', e.g. '10.0.0.11:104' (got {value!r})")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address (host names are not resolved; write the node's address)"
        ) from None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535 (got {port_text!r})")
    return HostPort(str(ip), int(port_text))


def parse_prefix(value: Any, *, bits: int) -> int:
    """Parse a netmask as a prefix length (``24``) or, for IPv4, a dotted mask (``255.255.255.0``)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a prefix length 0..{bits} (got {value!r})")
    if isinstance(value, int):
        if not 0 <= value <= bits:
            raise ValueError(f"prefix length must be 0..{bits} (got {value})")
        return value
    text = value.strip().lstrip("/") if isinstance(value, str) else ""
    if re.fullmatch(r"[0-9]{1,3}", text):
        return parse_prefix(int(text), bits=bits)
    if text and bits == 32:
        try:
            mask = int(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValueError(f"not a netmask: {value!r} (use e.g. 24 or 255.255.255.0)") from None
        ones = bin(mask).count("1")
        if mask != (0xFFFFFFFF << (32 - ones)) & 0xFFFFFFFF:
            raise ValueError(f"not a netmask: {value!r} (its one bits must come first, as in 255.255.255.0)")
        return ones
    raise ValueError(f"expected a prefix length 0..{bits} (got {value!r})")


_AE_ALLOWED = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: default repertoire, no backslash


def parse_ae_title(value: Any) -> str:
    """An AE title: 1 to 16 characters of the default repertoire, no backslash, not all spaces (PS3.5 6.2)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"an AE title is 1 to 16 characters (got {value!r})")
    title = value.strip()
    if not _AE_ALLOWED.match(title):
        raise ValueError(f"not a valid AE title: {value!r} (1 to 16 printable ASCII characters, no backslash)")
    return title


@dataclass(frozen=True, slots=True)
class StoreLocation:
    """Where the shared state lives (``cluster.store``): ``memory`` (this process only), or a Redis server
    (``redis://``, ``rediss://`` over TLS) or the master a set of Sentinels names (``redis+sentinel://``)."""

    kind: str  # "memory" | "redis" | "rediss" | "sentinel"
    hosts: tuple[tuple[str, int], ...] = ()  # one Redis server, or every Sentinel
    db: int = 0
    master: str | None = None  # sentinel: the monitored master's name
    username: str | None = None
    url: str = "memory"

    def __str__(self) -> str:
        return self.url


#: Redis and Sentinel listen on these unless the URL says otherwise.
REDIS_PORT = 6379
SENTINEL_PORT = 26379


def parse_store_location(value: Any) -> StoreLocation:
    """``memory``, ``redis://host[:port][/db]``, ``rediss://...`` or
    ``redis+sentinel://host[:port],host[:port]/master[/db]``. A password in the URL is refused: it belongs
    in ``cluster.password_file`` (a config file is read by many; a password file by pacslb alone)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected 'memory', 'redis://host:port/db' or 'redis+sentinel://host:26379,host2/master'")
    text = value.strip()
    if text == "memory":
        return StoreLocation("memory")
    scheme, sep, rest = text.partition("://")
    kinds = {"redis": "redis", "rediss": "rediss", "redis+sentinel": "sentinel"}
    if not sep or scheme not in kinds:
        raise ValueError(f"unknown store {text!r}: expected memory, redis://, rediss:// or redis+sentinel://")
    kind = kinds[scheme]
    authority, _, path = rest.partition("/")
    username = None
    if "@" in authority:
        userinfo, _, authority = authority.rpartition("@")
        if ":" in userinfo:
            raise ValueError("no password in the store URL: put it in cluster.password_file")
        username = userinfo or None
    default_port = SENTINEL_PORT if kind == "sentinel" else REDIS_PORT
    hosts = tuple(_store_host(part, default_port) for part in authority.split(","))
    if kind != "sentinel" and len(hosts) != 1:
        raise ValueError(f"{scheme}:// names one server (several are for redis+sentinel://)")
    parts = [p for p in path.split("/") if p] if path else []
    master = None
    if kind == "sentinel":
        if not parts:
            raise ValueError("redis+sentinel:// needs the master's name: redis+sentinel://host:26379/mymaster")
        master = parts.pop(0)
    if len(parts) > 1 or (parts and not parts[0].isdigit()):
        raise ValueError(f"expected a database number after the last '/', e.g. /0 (got {path!r})")
    db = int(parts[0]) if parts else 0
    return StoreLocation(kind, hosts, db, master, username, text)


def _store_host(text: str, default_port: int) -> tuple[str, int]:
    if not text:
        raise ValueError("a host is missing in the store URL")
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host or (port and (not port.isdigit() or not 1 <= int(port) <= 65535)):
        raise ValueError(f"expected host or host:port with a port from 1 to 65535 (got {text!r})")
    return host, int(port) if port else default_port
