"""The tcp check: the node accepts a TCP connection. Says nothing about the application behind it.

For a TLS node (mode dicom's ``node_tls``) it completes a TLS handshake too, then sends close_notify and
closes at once: a bare connect would make the node log a TLS error at every check, and waiting for the
node's own close_notify (as an asyncio TLS transport does) can hold a node that reads its connections one
at a time (Orthanc's DICOM TLS) until the wait ends. Hence a memory-BIO handshake on the socket itself."""

from __future__ import annotations

import asyncio
import socket
import ssl

from pacslb.checks.base import CheckResult, TlsTarget, describe_os_error, local_result
from pacslb.config.model import CheckSpec


async def check_tcp(
    spec: CheckSpec, host: str, port: int, tls: TlsTarget | None = None, prefix: bytes = b""
) -> CheckResult:
    loop = asyncio.get_running_loop()
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:  # out of descriptors here: nothing was learnt about the node
        return local_result(exc) or CheckResult(False, describe_os_error(exc))
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
    except OSError as exc:
        sock.close()
        return local_result(exc) or CheckResult(False, describe_os_error(exc))
    try:
        if prefix:
            await loop.sock_sendall(sock, prefix)
        if tls is None:
            return CheckResult(True, "connected")
        await _handshake(sock, tls)
    except ssl.SSLError as exc:
        return CheckResult(False, f"TLS handshake failed: {exc.reason or exc}")
    except OSError as exc:
        return local_result(exc) or CheckResult(False, describe_os_error(exc))
    finally:
        sock.close()
    return CheckResult(True, "TLS handshake done")


async def _handshake(sock: socket.socket, tls: TlsTarget) -> None:
    """A TLS handshake on ``sock``, then close_notify (the caller closes). Raises ssl.SSLError, OSError."""
    loop = asyncio.get_running_loop()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = tls.context.wrap_bio(incoming, outgoing, server_hostname=tls.server_name)

    async def flush() -> None:
        data = outgoing.read()
        if data:
            await loop.sock_sendall(sock, data)

    while True:
        try:
            tls_object.do_handshake()
            break
        except ssl.SSLWantReadError:
            await flush()
            data = await loop.sock_recv(sock, 16384)
            if not data:
                raise ConnectionResetError("the node closed during the TLS handshake") from None
            incoming.write(data)
    try:
        tls_object.unwrap()
    except ssl.SSLWantReadError:
        pass  # our close_notify is written; the node's is not waited for
    await flush()
