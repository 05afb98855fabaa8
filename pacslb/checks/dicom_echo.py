"""The dicom_echo check: a real association and C-ECHO (Verification, PS3.4 annex A) with the configured
calling and called AE titles. It proves the node's DICOM service answers, not only its port.

pynetdicom is thread-based, so each check runs in a worker thread of a dedicated pool (never the
loop's default executor, which other code may fill). A check the monitor gave up on keeps its thread
until pynetdicom's own timeouts, set to the check timeout, end it; the pool is sized so that such
stragglers cannot delay the checks of other nodes. pynetdicom is imported with this module (when the
first monitor of this kind is made, at start or reload), never inside a timed check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from typing import Any, cast

from pynetdicom import AE, evt

from pacslb.checks.base import CheckResult, TlsTarget, local_result
from pacslb.config.model import CheckSpec

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
#: Worker threads for C-ECHO checks. Each check holds one for at most about twice its timeout; 32 covers
#: dozens of nodes at a 2 s interval, and a thread costs little while it waits on a socket.
ECHO_THREADS = 32

_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(ECHO_THREADS, thread_name_prefix="pacslb-echo")
    return _pool


def _echo(host: str, port: int, calling: str, called: str, timeout: float, tls: TlsTarget | None) -> CheckResult:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    answers: list[Any] = []
    connected: list[bool] = []
    handlers: list[Any] = [
        (evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive)),
        (evt.EVT_CONN_OPEN, lambda event: connected.append(True)),
    ]
    try:
        # (A None name: no name to check, which pynetdicom passes on to wrap_socket although typed str.)
        tls_args = (tls.context, cast(str, tls.server_name)) if tls is not None else None
        assoc = ae.associate(host, port, ae_title=called, evt_handlers=handlers, tls_args=tls_args)
    except Exception as exc:  # pynetdicom raises little, but a check must never crash the monitor
        return local_result(exc) or _local_or(CheckResult(False, f"association failed: {exc}"))
    try:
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status is None or "Status" not in status:
                return CheckResult(False, "no C-ECHO response (timeout or abort)")
            if status.Status != 0:
                return CheckResult(False, f"C-ECHO status 0x{int(status.Status):04X}")
            return CheckResult(True, "C-ECHO success")
        if assoc.is_rejected:
            rj = next((a for a in answers if hasattr(a, "result_str") and a.result in (1, 2)), None)
            if rj is not None:
                return CheckResult(
                    False,
                    f"rejected ({rj.result}, {rj.result_source}, {rj.diagnostic}): "
                    f"{rj.result_str}, {rj.source_str}, {rj.reason_str}",
                )
            return CheckResult(False, "association rejected")
        if not connected:
            return _local_or(CheckResult(False, "no connection (refused, unreachable or timed out)"))
        if assoc.is_aborted:
            return CheckResult(False, "association aborted by the node")
        return CheckResult(False, "no answer to A-ASSOCIATE-RQ")
    finally:
        if assoc.is_established:
            assoc.abort()
        ae.shutdown()


def _local_or(result: CheckResult) -> CheckResult:
    """``result``, unless this process cannot make a socket now: pynetdicom reports a socket it could not
    make (out of descriptors) like a node that refused, so a failed connection is checked against that."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except OSError as exc:
        return local_result(exc) or result
    return result


async def check_dicom_echo(
    spec: CheckSpec, host: str, port: int, tls: TlsTarget | None = None, prefix: bytes = b""
) -> CheckResult:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        _executor(), _echo, host, port, spec.calling_ae, spec.called_ae, spec.timeout, tls
    )
