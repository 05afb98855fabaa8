"""``pacslb health`` and ``pacslb role`` as keepalived runs them: every second, with a timeout of its own.

What this module owns: answering those two commands in a few tens of milliseconds, with the standard library
and PyYAML only. The full command line (pacslb/cli.py) validates the whole config with pydantic and loads
asyncio: about 0.3 s of imports on an idle machine, several times that on a loaded one, which made the
health check time out and keepalived take the virtual IP away from a balancer that served well (measured:
33 timeouts in one bench run). Here only the ``admin`` section is read (where the API listens, the token
file), and the request is made with http.client.

Anything out of the ordinary (a file it cannot read, an admin section it does not understand) is left to
the full command line, which gives the same answer with its proper messages: this is a shortcut, never a
second definition of the config.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from typing import Any

#: Where the admin API listens when the config says nothing else (config/model.py, DEFAULT_ADMIN_LISTEN).
DEFAULT_LISTEN = ("127.0.0.1", 9900)
HEALTH_TIMEOUT = 1.0  # as pacslb/cli.py
ROLE_TIMEOUT = 3.0
ROLES = ("master", "backup", "fault", "stopped")


class _Unusual(Exception):
    """Not for the shortcut: the full command line handles it."""


def _admin(path: str) -> tuple[str, int, str | None]:
    """(host, port, token file) of the admin API the config at ``path`` names."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.load(handle, Loader=loader)  # a safe loader (CSafeLoader or SafeLoader)
    except (OSError, yaml.YAMLError) as exc:
        raise _Unusual from exc
    section = document.get("admin") if isinstance(document, dict) else None
    if not isinstance(section, dict):
        raise _Unusual
    listen = section.get("listen", f"{DEFAULT_LISTEN[0]}:{DEFAULT_LISTEN[1]}")
    token_file = section.get("token_file")
    if not isinstance(listen, str) or not (token_file is None or isinstance(token_file, str)):
        raise _Unusual
    host, sep, port = listen.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise _Unusual
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return host, int(port), token_file


def _request(
    host: str, port: int, method: str, path: str, timeout: float, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, bytes]:
    """One request, ``timeout`` bounding the whole exchange (a stopped balancer must not hold it longer)."""
    deadline = time.monotonic() + timeout
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.connect()
        assert connection.sock is not None
        connection.sock.settimeout(max(0.001, deadline - time.monotonic()))
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(65536)
    finally:
        connection.close()


def health(config: str, timeout: float) -> int:
    host, port, _ = _admin(config)
    url = f"http://{host}:{port}/healthz"
    try:
        status, body = _request(host, port, "GET", "/healthz", timeout, {"Accept": "application/json"})
    except TimeoutError:
        print(f"pacslb health: {url} did not answer within {timeout:g} s", file=sys.stderr)
        return 1
    except (OSError, http.client.HTTPException) as exc:
        print(f"pacslb health: {url}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(
            f"pacslb health: {url} answered {status}: {body.decode('utf-8', 'replace').strip()[:200]}", file=sys.stderr
        )
        return 1
    return 0


def role(config: str, reported: str) -> int:
    host, port, token_file = _admin(config)
    headers = {"Accept": "application/json", "Content-Type": "application/json", "X-Pacslb-Request": "1"}
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as handle:
                headers["Authorization"] = f"Bearer {handle.readline().strip()}"
        except OSError as exc:
            raise _Unusual from exc
    body = json.dumps({"role": reported}).encode()
    try:
        status, answer = _request(host, port, "POST", "/api/v1/cluster/role", ROLE_TIMEOUT, headers, body)
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or exc
        print(
            f"pacslb role: cannot reach the admin API at http://{host}:{port} (admin.listen of {config}): {reason}",
            file=sys.stderr,
        )
        return 1
    try:
        data: Any = json.loads(answer)
    except ValueError:
        data = {}
    if status != 200 or not isinstance(data, dict):
        detail = data.get("detail") if isinstance(data, dict) else None
        print(f"pacslb role: {detail or f'HTTP {status}'}", file=sys.stderr)
        return 1
    print(f"{data.get('node')}: {data.get('role')}" + ("" if data.get("changed") else " (unchanged)"))
    return 0


def main(argv: list[str]) -> int | None:
    """``health CONFIG [--timeout S]`` or ``role CONFIG ROLE``; None when the full command line must answer
    (other arguments, or an unusual config)."""
    try:
        if len(argv) == 2 and argv[0] == "health":
            return health(argv[1], HEALTH_TIMEOUT)
        if len(argv) == 4 and argv[0] == "health" and argv[2] == "--timeout":
            seconds = float(argv[3])
            return health(argv[1], seconds) if 0 < seconds <= 60 else None
        if len(argv) == 3 and argv[0] == "role" and argv[2] in ROLES:
            return role(argv[1], argv[2])
    except (_Unusual, ValueError):
        return None
    return None
