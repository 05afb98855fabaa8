"""The http check: a HEAD or GET whose status is in ``expect_status`` (and whose body, for GET, contains
``expect_body``). One new connection per check, no keep-alive, like HAProxy's httpchk, so a node whose
listener is stuck cannot pass on an old connection."""

from __future__ import annotations

import httpx

from pacslb.checks.base import CheckResult, describe_os_error
from pacslb.config.model import CheckSpec

#: Bytes of body read to look for expect_body; a health page is small, and a check must stay cheap.
MAX_CHECK_BODY = 64 * 1024


async def check_http(spec: CheckSpec, host: str, port: int) -> CheckResult:
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = {"Host": spec.host or netloc, "User-Agent": "pacslb-check", "Connection": "close"}
    limits = httpx.Limits(max_keepalive_connections=0)
    # The monitor enforces the check timeout; httpx's own is a backstop.
    timeout = httpx.Timeout(spec.timeout + 1.0)
    try:
        async with (
            httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client,
            client.stream(spec.method, f"http://{netloc}{spec.path}", headers=headers) as response,
        ):
            body = b""
            if spec.expect_body is not None:
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) >= MAX_CHECK_BODY or spec.expect_body.encode() in body:
                        break
    except httpx.HTTPError as exc:
        return CheckResult(False, describe_os_error(exc))
    if response.status_code not in spec.expect_status:
        return CheckResult(False, f"HTTP {response.status_code}")
    if spec.expect_body is not None and spec.expect_body.encode() not in body:
        return CheckResult(False, f"HTTP {response.status_code}, body lacks {spec.expect_body!r}")
    return CheckResult(True, f"HTTP {response.status_code}")
