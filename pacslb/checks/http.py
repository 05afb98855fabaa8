"""The http check: a HEAD or GET whose status is in ``expect_status`` (and whose body, for GET, contains
``expect_body``). One new connection per check, no keep-alive, like HAProxy's httpchk, so a node whose
listener is stuck cannot pass on an old connection.

Clock check: every answer's Date header is compared with pacslb's clock. A node further off than
``max_clock_skew`` is reported with a ``clock_skew`` warning (again at most every
:data:`SKEW_REPEAT` while it stays off) and a ``clock_ok`` line when it is back; the skew never changes the
node's health (a PACS with a wrong clock still serves, but misorders studies: someone must fix its NTP).

httpx is imported when the first http check is set up (:func:`prepare`), not with this module: the engine
imports this module to close its clients, and httpx (with the optional CLI its package pulls in) costs
megabytes that a balancer without http checks would carry for nothing."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import ssl
import time
from typing import TYPE_CHECKING

from pacslb.checks.base import CheckResult, TlsTarget, describe_os_error, local_result
from pacslb.config.model import CheckSpec
from pacslb.logs import log_event

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("pacslb.health")

#: While a node's clock stays off, the warning is repeated this often (not at every check: a node checked
#: every 2 s would flood the log).
SKEW_REPEAT = 600.0
#: Date has a resolution of one second (RFC 9110 5.6.7): the true time of the answer lies within the
#: second it names, so its middle is the best estimate.
DATE_RESOLUTION = 1.0

#: (host, port) -> when the last skew warning for that node was logged (monotonic).
_skewed: dict[tuple[str, int], float] = {}

#: Bytes of body read to look for expect_body; a health page is small, and a check must stay cheap.
MAX_CHECK_BODY = 64 * 1024


_clients: dict[int, httpx.AsyncClient] = {}
_tls: ssl.SSLContext | None = None


def prepare() -> None:
    """Build what every http check shares, outside any timed check: loading the CA store takes tens of
    milliseconds of blocking work, and so does importing httpx. Called when the first monitor of this kind is
    made."""
    global _tls
    import httpx  # noqa: F401

    if _tls is None:
        _tls = ssl.create_default_context()


def _client() -> httpx.AsyncClient:
    """One client per event loop, shared by every http check: making one costs tens of milliseconds of
    blocking work (it builds a TLS context), which must not happen on every check."""
    import httpx

    loop_id = id(asyncio.get_running_loop())
    client = _clients.get(loop_id)
    if client is None:
        prepare()
        client = _clients[loop_id] = httpx.AsyncClient(
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=False,
            follow_redirects=False,
            verify=_tls or True,
        )
    return client


async def close_clients() -> None:
    """Close the shared clients (the engine calls this when it stops)."""
    clients = list(_clients.values())
    _clients.clear()
    for client in clients:
        await client.aclose()


async def check_http(
    spec: CheckSpec, host: str, port: int, tls: TlsTarget | None = None, prefix: bytes = b""
) -> CheckResult:
    import httpx

    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = {
        "Host": spec.host or netloc,
        "User-Agent": "pacslb-check",
        "Connection": "close",
        "Accept-Encoding": "identity",  # expect_body is looked for in the body as sent
    }
    # The monitor enforces the check timeout; httpx's own is a backstop.
    timeout = httpx.Timeout(spec.timeout + 1.0)
    try:
        async with _client().stream(
            spec.method, f"http://{netloc}{spec.path}", headers=headers, timeout=timeout
        ) as response:
            body = b""
            if spec.expect_body is not None:
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= MAX_CHECK_BODY or spec.expect_body.encode() in body:
                        break
    except httpx.HTTPError as exc:
        return local_result(exc) or CheckResult(False, describe_os_error(exc))
    _check_clock(response.headers.get("date"), time.time(), spec.max_clock_skew, host, port)
    if response.status_code not in spec.expect_status:
        return CheckResult(False, f"HTTP {response.status_code}")
    if spec.expect_body is not None and spec.expect_body.encode() not in body:
        return CheckResult(False, f"HTTP {response.status_code}, body lacks {spec.expect_body!r}")
    return CheckResult(True, f"HTTP {response.status_code}")


def clock_skew(date: str | None, now: float) -> float | None:
    """How far ahead of ``now`` (seconds since the epoch) a node's Date header is; None without a valid one."""
    if not date:
        return None
    try:
        when = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp() + DATE_RESOLUTION / 2 - now


def _check_clock(date: str | None, now: float, limit: float, host: str, port: int) -> None:
    skew = clock_skew(date, now)
    if skew is None:
        return
    key = (host, port)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if abs(skew) > limit:
        last = _skewed.get(key)
        mono = time.monotonic()
        if last is None or mono - last >= SKEW_REPEAT:
            _skewed[key] = mono
            log_event(log, "clock_skew", logging.WARNING, address=address, skew=skew, limit=limit)
    elif _skewed.pop(key, None) is not None:
        log_event(log, "clock_ok", address=address, skew=skew)
