"""The tcp check: the node accepts a TCP connection. Says nothing about the application behind it."""

from __future__ import annotations

import asyncio
import socket

from pacslb.checks.base import CheckResult, describe_os_error, local_result
from pacslb.config.model import CheckSpec


async def check_tcp(spec: CheckSpec, host: str, port: int) -> CheckResult:
    loop = asyncio.get_running_loop()
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:  # out of descriptors here: nothing was learnt about the node
        return local_result(exc) or CheckResult(False, describe_os_error(exc))
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
    except OSError as exc:
        return local_result(exc) or CheckResult(False, describe_os_error(exc))
    finally:
        sock.close()
    return CheckResult(True, "connected")
