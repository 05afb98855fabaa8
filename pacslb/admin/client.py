"""The operations commands of the ``pacslb`` CLI: status, drain, halt, online, weight, reload.

What this module owns: talking to a running pacslb's admin API (``--admin URL``, default
:data:`DEFAULT_ADMIN` or ``$PACSLB_ADMIN``; the token from ``--token-file`` or ``$PACSLB_TOKEN``) and
printing what it answers for a person (tables) or a script (``--json``). It holds no state and decides
nothing: the API does. Exit codes: 0 done, 1 the API refused or could not be reached (its message is
printed), 2 wrong usage (argparse).

httpx is imported by the first request: the CLI builds its parser, and so imports this module, for every
command, ``pacslb run`` included, which would otherwise keep httpx's megabytes for its whole life.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

#: Where the API is when neither --admin nor $PACSLB_ADMIN says (the config's default admin.listen).
DEFAULT_ADMIN = "http://127.0.0.1:9900"
#: A request to the balancer's own loop answers in milliseconds; a reload may take a second or two.
CLI_TIMEOUT = 15.0


class ApiError(Exception):
    """The API could not be reached or refused the request; the message is for the user."""


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as handle:
                return handle.readline().strip()
        except OSError as exc:
            raise ApiError(f"cannot read the token file {args.token_file}: {exc.strerror or exc}") from exc
    return os.environ.get("PACSLB_TOKEN") or None


def call(args: argparse.Namespace, method: str, path: str, body: Any = None, timeout: float = CLI_TIMEOUT) -> Any:
    """One API request; returns the JSON answer. ``timeout`` bounds the connect and each read.

    Raises:
        ApiError: not reachable, or an answer other than 2xx (with the API's own message).
    """
    import httpx

    url = args.admin.rstrip("/") + path
    # X-Pacslb-Request marks the request as no browser's form: the API refuses a change without it (or a
    # JSON body) with 415 (pacslb/admin/guard.py).
    headers = {"Accept": "application/json", "X-Pacslb-Request": "1"}
    token = _token(args)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.request(method, url, headers=headers, json=body, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        raise ApiError(
            f"cannot reach the admin API at {args.admin}: {exc} (is pacslb running with an `admin:` section? "
            "use --admin URL or PACSLB_ADMIN)"
        ) from exc
    try:
        data = response.json()
    except ValueError:
        data = {}
    if response.status_code == 401:
        raise ApiError("the admin API needs its token: give --token-file FILE or set PACSLB_TOKEN")
    if response.status_code >= 300 and not (path == "/api/v1/reload" and "applied" in data):
        detail = data.get("detail") if isinstance(data, dict) else None
        raise ApiError(f"{detail or f'HTTP {response.status_code}'}")
    return data


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    seconds = max(0.0, now - ts)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _role(status: dict[str, Any], now: float) -> str:
    """``, role master (since 2 min ago)`` where keepalived reports (or is expected to report) a role."""
    role = status.get("role", "unknown")
    if role == "unknown" and not status.get("vrrp"):
        return ""
    since = status.get("role_since")
    return f", role {role}" + (f" (since {_ago(since, now)})" if since else "")


def _store(status: dict[str, Any], now: float) -> str | None:
    """``store redis://... (lb1): connected, synced`` for a shared store; None for the memory store."""
    cluster = status.get("cluster") or {}
    store = cluster.get("store") or {}
    if store.get("kind", "memory") == "memory":
        return None
    if store.get("connected"):
        state = "connected, " + ("synced" if store.get("synced") else "reading the shared table")
    else:
        since = store.get("down_since")
        state = "DOWN" + (f" since {_ago(since, now)}" if since else "") + f": {store.get('last_error') or '?'}"
        state += " (connections go on with this balancer's own table)"
    return f"store {store.get('url')} (this balancer: {cluster.get('node')}): {state}"


def format_status(status: dict[str, Any]) -> str:
    """The status document as a person reads it: a header line and one table row per server."""
    now = time.time()
    lines = [
        f"pacslb {status['version']}, config {status['config'] or '(demo)'}, started {_ago(status['started_at'], now)}"
        + (f", reloaded {_ago(status['reloaded_at'], now)}" if status.get("reloaded_at") else "")
        + _role(status, now)
    ]
    store = _store(status, now)
    if store is not None:
        lines.append(store)
    rows = [["SERVICE", "NODE", "ADDRESS", "HEALTH", "ADMIN", "WEIGHT", "ACTIVE/TOTAL", "LAST CHECK"]]
    for service in status["services"]:
        for server in service["servers"]:
            health = server["health"] + (f" (via {server['down_via']})" if server.get("down_via") else "")
            check = server.get("check")
            if check is None:
                last = "no check"
            else:
                took = f", {check['duration'] * 1000:.0f} ms" if check.get("duration") is not None else ""
                last = f"{check['reason']}{took}, {_ago(check.get('at'), now)}"
            rows.append([
                service["name"], server["name"], server["address"], health, server["admin"],
                str(server["weight"]), f"{server['active']}/{server['total']}", last,
            ])  # fmt: skip
    lines.append(_table(rows))
    down = [s["name"] for s in status["services"] if s["state"] == "down"]
    if down:
        lines.append(f"NO USABLE SERVER: {', '.join(down)}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    status = call(args, "GET", "/api/v1/status")
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0


def cmd_action(args: argparse.Namespace) -> int:
    if args.service:
        path = f"/api/v1/services/{args.service}/servers/{args.node}/{args.command}"
    else:
        path = f"/api/v1/nodes/{args.node}/{args.command}"
    result = call(args, "POST", path)
    print(result.get("message", f"{args.node}: {args.command}"))
    return 0


def cmd_weight(args: argparse.Namespace) -> int:
    weight = None if args.weight == "config" else int(args.weight)
    base = f"/api/v1/services/{args.service}/servers/{args.node}" if args.service else f"/api/v1/nodes/{args.node}"
    result = call(args, "PUT", f"{base}/weight", {"weight": weight})
    shown = result["weight"] if result["weight"] is not None else "as configured"
    print(f"{args.node}: weight {shown} in {', '.join(result['services'])}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    result = call(args, "POST", "/api/v1/reload")
    if result.get("applied"):
        print("reloaded")
        return 0
    for error in result.get("errors", []):
        print(error, file=sys.stderr)
    print("reload refused: the running config stays", file=sys.stderr)
    return 1


def _weight(value: str) -> str:
    if value == "config" or (value.isdigit() and 0 <= int(value) <= 256):
        return value
    raise argparse.ArgumentTypeError("a weight is 0..256, or 'config' for the config's weight")


def add_commands(sub: Any) -> None:
    """Add the operations commands to the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        default=os.environ.get("PACSLB_ADMIN", DEFAULT_ADMIN),
        metavar="URL",
        help=f"the admin API (default: $PACSLB_ADMIN or {DEFAULT_ADMIN})",
    )
    common.add_argument("--token-file", metavar="FILE", help="file holding the admin token (default: $PACSLB_TOKEN)")

    status = sub.add_parser("status", parents=[common], help="services, nodes, health and admin states")
    status.add_argument("--json", action="store_true", help="print the API's JSON document")
    status.set_defaults(func=_guarded(cmd_status))
    helps = {
        "drain": "no new clients for a node (pinned clients and open connections go on)",
        "halt": "no connections at all for a node (open ones closed after halt_grace)",
        "online": "put a node back into service",
    }
    for action, text in helps.items():
        parser = sub.add_parser(action, parents=[common], help=text)
        parser.add_argument("node", help="node (server name)")
        parser.add_argument("--service", metavar="S", help="only in this service (default: every service)")
        parser.set_defaults(func=_guarded(cmd_action))
    weight = sub.add_parser("weight", parents=[common], help="set a node's weight at run time (kept across reloads)")
    weight.add_argument("node")
    weight.add_argument("weight", type=_weight, help="0..256, or 'config' to go back to the config's weight")
    weight.add_argument("--service", metavar="S", help="only in this service (default: every service)")
    weight.set_defaults(func=_guarded(cmd_weight))
    reload = sub.add_parser("reload", parents=[common], help="reload the config of a running pacslb (as SIGHUP)")
    reload.set_defaults(func=_guarded(cmd_reload))


def _guarded(command: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            code: int = command(args)
        except ApiError as exc:
            print(f"pacslb {args.command}: {exc}", file=sys.stderr)
            return 1
        return code

    return run
