"""Which admin requests are refused before routing, and why: a pure function of a request's method and
headers and of the listener's addresses. No I/O here; api.py applies it to every request, token or not.

Theory of operation. The admin API is reached by browsers (the dashboard), and a browser also runs pages
from anywhere else. Two ways such a page could use the operator's browser against the API are shut here;
the token (api.py) is a third wall, not a replacement for these:

- DNS rebinding. A page at ``http://rebind.evil.example:9900/`` whose name is then made to resolve to
  127.0.0.1 is, to the browser, the same origin as the API: it could read every answer. Its requests name
  that host in ``Host``. So the only ``Host`` names served are loopback addresses, ``localhost``, the
  address the listener is configured on and the address the request came in on (a listener on 0.0.0.0
  is reached at one of the machine's addresses); anything else is a 403. An address never names an
  attacker's page: a page at ``http://127.0.0.1:9900/`` *is* the API's own origin.
- Cross-site request forgery. A page elsewhere can make the browser send a "simple" request without
  asking the server first: a form POST, ``Content-Type: text/plain``, ``Origin: null`` (a sandboxed frame,
  a ``data:`` URL). A write (any method but GET, HEAD, OPTIONS) therefore needs ``Content-Type:
  application/json`` or an ``X-Pacslb-Request`` header, which a browser sends cross-origin only after a
  CORS preflight that this API never approves (415 otherwise); and it is refused (403) with an ``Origin``
  other than the API's own, ``null`` included, or with ``Sec-Fetch-Site: cross-site``.

The CLI (client.py) and the dashboard send ``X-Pacslb-Request: 1`` with every request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

#: The header that marks a request as made by a program that chose to (CLI, dashboard, scripts): a
#: browser adds it to a cross-origin request only after a preflight, which the API never approves.
WRITE_HEADER = "x-pacslb-request"
#: The media type a write may carry instead (a cross-origin request with it needs a preflight too).
JSON_MEDIA_TYPE = "application/json"
#: Methods that change nothing; every other one is a write.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: A Host header: a name or IPv4 address, or an IPv6 address in brackets (an RFC 6874 zone allowed),
#: then an optional port. Anything else (user info, a path, spaces) is no Host a browser sends.
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+(?:%25[0-9A-Za-z._~-]+)?)\]|(?P<name>[^\[\]:@/\\\s]+))(?::\d{1,5})?")


@dataclass(frozen=True)
class Refusal:
    """What a refused request is answered: an HTTP status and the reason, for the ``detail`` field."""

    status: int
    detail: str


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address (an IPv4-mapped IPv6 address as its IPv4 address), or None."""
    if not text:
        return None
    try:
        found = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(found, ipaddress.IPv6Address) and found.ipv4_mapped is not None:
        return found.ipv4_mapped
    return found


def host_allowed(host: str, listen: str, local: str | None = None, names: tuple[str, ...] = ()) -> bool:
    """Whether a request naming ``host`` (a Host header's value) may be served.

    Args:
        host: the Host header, e.g. ``127.0.0.1:9900``, ``[::1]:9900``, ``localhost``; empty when absent
            (only a program can omit it, HTTP/1.0 style: no browser does, so it is served).
        listen: the address the listener is configured on (``127.0.0.1``, ``::``, ``10.0.0.5``).
        local: the address the request's connection came in on, when known.
        names: more host names the operator configured (``admin.hosts``: the balancer's own DNS names).

    Returns:
        True for loopback addresses, ``localhost``, ``listen``, ``local`` and ``names``; False for any other.
    """
    if not host:
        return True
    match = _HOST.fullmatch(host.strip())
    if match is None:
        return False
    name = match.group("name")
    if name is not None and (name.lower() == "localhost" or name.lower().rstrip(".") in names):
        return True
    v6 = match.group("v6")
    given = _address(v6.replace("%25", "%") if v6 is not None else name)
    if given is None:
        return False
    if given.is_loopback:
        return True
    return given in {a for a in (_address(listen), _address(local)) if a is not None and not a.is_unspecified}


def _media_type(value: str) -> str:
    return value.partition(";")[0].strip().lower()


def refusal(
    method: str, headers: Mapping[str, str], listen: str, local: str | None = None, names: tuple[str, ...] = ()
) -> Refusal | None:
    """Why a request must be refused before it reaches an endpoint, or None.

    Args:
        method: the request method.
        headers: the request headers, names in lower case.
        listen: the listener's configured address; ``local``: the address the connection came in on.
        names: the host names of ``admin.hosts`` (lower case).

    Returns:
        403 for a foreign Host name (DNS rebinding) and for a cross-origin write; 415 for a write that
        carries neither ``Content-Type: application/json`` nor ``X-Pacslb-Request``; None otherwise.
    """
    host = headers.get("host", "")
    if not host_allowed(host, listen, local, names):
        detail = f"Host {host!r} is not a name of this admin listener: use its IP address, or add it to admin.hosts"
        return Refusal(403, detail)
    if method.upper() in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    if origin is not None:
        if origin.strip().lower() == "null":
            return Refusal(403, "a change from an opaque origin (Origin: null) is refused")
        if urlsplit(origin.strip()).netloc.lower() != host.strip().lower():
            return Refusal(403, f"cross-origin request from {origin} refused")
    if headers.get("sec-fetch-site", "").lower() == "cross-site":
        return Refusal(403, "cross-site request refused")
    if WRITE_HEADER not in headers and _media_type(headers.get("content-type", "")) != JSON_MEDIA_TYPE:
        return Refusal(
            415, f"a change needs Content-Type: {JSON_MEDIA_TYPE} or an X-Pacslb-Request: 1 header (pacslb's "
            "CLI and dashboard send it)"
        )  # fmt: skip
    return None
