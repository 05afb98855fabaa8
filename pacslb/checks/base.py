"""What every check kind returns, and the table of kinds."""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pacslb.config.model import CheckSpec
from pacslb.descriptors import is_local


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    reason: str  # short, for the log and the dashboard: "connected", "HTTP 503", "connection refused"
    duration: float = 0.0  # seconds; filled in by the monitor
    # The check could not be made for a reason of pacslb's own (out of descriptors or socket memory when
    # making its socket): it says nothing about the node, and the monitor does not count it.
    local: bool = False


@dataclass(frozen=True, slots=True)
class TlsTarget:
    """A node spoken to over TLS (mode dicom's ``node_tls``): the client context, and the name its
    certificate must carry (None: the chain is checked, not the name)."""

    context: ssl.SSLContext
    server_name: str | None


def local_result(exc: BaseException) -> CheckResult | None:
    """A ``local`` failed result when ``exc`` (or what caused it) is pacslb running out of descriptors or
    socket memory (pacslb/descriptors.py), else None."""
    if is_local(exc):
        return CheckResult(False, f"not checked: {describe_os_error(exc)}", local=True)
    return None


def describe_os_error(exc: BaseException) -> str:
    """A short reason from the first OSError in an exception chain: "connection refused", ..."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno).lower()
        seen = seen.__cause__ or seen.__context__
    return (str(exc) or type(exc).__name__).lower()


#: A check kind: (spec, host, port, tls, prefix) -> result. It must not block the event loop, and may be
#: cancelled by the monitor's timeout at any await. ``tls``: the node speaks TLS (tcp and dicom_echo checks
#: then do too; an http check stays plain HTTP, to a web port). ``prefix``: bytes a tcp check sends first
#: (the PROXY protocol's LOCAL header, to a node that expects one).
CheckFunction = Callable[[CheckSpec, str, int, TlsTarget | None, bytes], Awaitable[CheckResult]]


def get_check(kind: str) -> CheckFunction:
    """The check function for a config ``check.type`` (not ``none``)."""
    if kind == "tcp":
        from pacslb.checks.tcp import check_tcp

        return check_tcp
    if kind == "http":
        from pacslb.checks.http import check_http, prepare

        prepare()
        return check_http
    if kind == "dicom_echo":
        from pacslb.checks.dicom_echo import check_dicom_echo

        return check_dicom_echo
    raise ValueError(f"no check of type {kind!r}")
