"""The ``pacslb`` command: run, check, demo, the operations commands (pacslb/admin/client.py), and what
keepalived runs for a clustered pair: ``keepalived``, ``health``, ``role`` (pacslb/cluster). The only
place that prints for the user and exits.

Exit codes: 0 success, 1 invalid config or failed start, 2 wrong usage (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from pacslb import __version__
from pacslb.config import load_config
from pacslb.config.model import AdminSpec, ServiceSpec
from pacslb.errors import ConfigError, PacslbError
from pacslb.logs import log_event, setup_logging


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop (the default asyncio loop where uvloop is not installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _report(exc: ConfigError) -> None:
    for issue in exc.issues:
        print(issue, file=sys.stderr)
    print(f"{len(exc.issues)} error(s)", file=sys.stderr)


def _summary(spec: ServiceSpec) -> str:
    """One service as ``pacslb check`` names it: "dicom 0.0.0.0:2762, TLS (client certificate required), 2
    servers over TLS"."""
    words = [f"{spec.mode} {spec.listen}"]
    dicom = spec.dicom
    if dicom is not None and dicom.tls is not None:
        words.append(f"TLS (client certificate {dicom.tls.client_certificate})")
    if spec.http is not None and spec.http.tls is not None:
        words.append("TLS")
    kind = "destinations by called AE" if dicom is not None and dicom.destination == "called_ae" else "servers"
    over = " over TLS" if dicom is not None and dicom.node_tls is not None else ""
    words.append(f"{len(spec.servers)} {kind}{over}")
    if spec.proxy_protocol != "none":
        words.append(f"PROXY {spec.proxy_protocol}")
    return ", ".join(words)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _report(exc)
        return 1
    names = ", ".join(f"{n} ({_summary(s)})" for n, s in config.services.items())
    print(f"{args.config}: OK: {names}")
    from pacslb import compiled

    print(f"per-request path: {compiled.status()}")  # pip install . compiles it where it can (setup.py)
    return 0


def _raise_descriptor_limit() -> None:
    """A balancer holds two sockets per connection: the soft limit most systems give (1,024) is raised to the
    hard one before anything is started (workers inherit it). pacslb/descriptors.py has the rest."""
    from pacslb.descriptors import raise_limit

    raise_limit()


def cmd_run(args: argparse.Namespace) -> int:
    _raise_descriptor_limit()
    if args.config is None:
        print("pacslb run: no config given; starting the embedded demo (pacslb demo)", file=sys.stderr)
        return cmd_demo(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _report(exc)
        return 1
    setup_logging(config.log.format, config.log.level)
    _warn_if_stale()
    from pacslb.cluster.process import name_process

    name_process()  # keepalived's track_process knows the balancer by it (pacslb/cluster/process.py)
    from pacslb.engine import serve

    try:
        run_loop(serve(config, args.config))
    except PacslbError as exc:
        print(f"pacslb: {exc}", file=sys.stderr)
        return 1
    return 0


def _warn_if_stale() -> None:
    """A compiled module older than its source runs the code before the edit: say so (pacslb/compiled.py)."""
    from pacslb import compiled

    old = compiled.stale()
    if old:
        log_event(
            logging.getLogger("pacslb"),
            "compiled_stale",
            logging.WARNING,
            modules=",".join(old),
            detail="compiled modules older than their sources run the old code: rebuild (make compile)",
        )


def cmd_demo(args: argparse.Namespace) -> int:
    _raise_descriptor_limit()
    from pacslb import demo

    return demo.main(args)


# -- a clustered pair: what keepalived runs (docs/high-availability.md) ---------------------------------------

#: ``pacslb health`` waits this long for /healthz unless told (keepalived's script passes its own, shorter
#: than the check interval): a loop that runs answers a loopback request in milliseconds.
HEALTH_TIMEOUT = 1.0
#: ``pacslb role`` gives up after this: keepalived waits for its notify scripts, and a balancer that does
#: not answer within it is hung (its health check fails too).
ROLE_TIMEOUT = 3.0


def cmd_keepalived(args: argparse.Namespace) -> int:
    from pacslb.cluster.keepalived import KeepalivedError, render
    from pacslb.cluster.process import command_line

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _report(exc)
        return 1
    try:
        text = render(config, os.path.abspath(args.config), command_line())
    except KeepalivedError as exc:
        print(f"pacslb keepalived: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def _admin_target(path: str) -> tuple[str, str | None]:
    """The admin API's URL and token file named by the config at ``path``.

    Only the ``admin`` section must be valid: a file broken elsewhere (an edit not reloaded yet) must not
    fail the health check of a balancer that serves well with the config it loaded, on both balancers of a
    pair at once.

    Raises:
        ConfigError: the admin section cannot be read (with every problem of the whole file).
    """
    from pacslb.errors import ConfigIssue

    try:
        admin = load_config(path).admin
    except ConfigError as exc:
        admin = _admin_section_alone(path, exc)
    if admin is None:
        raise ConfigError([ConfigIssue(path, None, "admin", "no admin section: there is no admin API to ask")])
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(admin.listen.host, admin.listen.host)
    url = f"http://[{host}]:{admin.listen.port}" if ":" in host else f"http://{host}:{admin.listen.port}"
    return url, admin.token_file


def _admin_section_alone(path: str, error: ConfigError) -> AdminSpec | None:
    import yaml
    from pydantic import ValidationError

    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
        section = raw.get("admin") if isinstance(raw, dict) else None
        return None if section is None else AdminSpec.model_validate(section)
    except (OSError, yaml.YAMLError, ValidationError, ValueError) as exc:
        raise error from exc


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when this balancer's /healthz answers 200 within the timeout; else 1 and one line on stderr."""
    import http.client
    import time
    from urllib.parse import urlsplit

    try:
        url, _ = _admin_target(args.config)
    except ConfigError as exc:
        print(f"pacslb health: {exc.issues[0]}", file=sys.stderr)
        return 1
    where = urlsplit(url)
    deadline = time.monotonic() + args.timeout
    connection = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=args.timeout)
    try:
        connection.connect()
        assert connection.sock is not None
        connection.sock.settimeout(max(0.001, deadline - time.monotonic()))  # the whole exchange, not each read
        connection.request("GET", "/healthz", headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read(4096).decode("utf-8", "replace")
    except TimeoutError:
        print(f"pacslb health: {url}/healthz did not answer within {args.timeout:g} s", file=sys.stderr)
        return 1
    except (OSError, http.client.HTTPException) as exc:
        print(f"pacslb health: {url}/healthz: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if response.status != 200:
        print(f"pacslb health: {url}/healthz answered {response.status}: {body.strip()[:200]}", file=sys.stderr)
        return 1
    return 0


def cmd_role(args: argparse.Namespace) -> int:
    """Tell the running pacslb the role keepalived reports (POST /api/v1/cluster/role)."""
    from pacslb.admin import client

    try:
        url, token_file = _admin_target(args.config)
    except ConfigError as exc:
        print(f"pacslb role: {exc.issues[0]}", file=sys.stderr)
        return 1
    target = argparse.Namespace(admin=url, token_file=token_file)
    try:
        answer = client.call(target, "POST", "/api/v1/cluster/role", {"role": args.role}, timeout=ROLE_TIMEOUT)
    except client.ApiError as exc:
        cause = exc.__cause__
        reason = f"cannot reach the admin API at {url} (admin.listen of {args.config}): {cause}" if cause else exc
        print(f"pacslb role: {reason}", file=sys.stderr)
        return 1
    print(f"{answer['node']}: {answer['role']}" + ("" if answer.get("changed") else " (unchanged)"))
    return 0


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, e.g. 0.5 (got {value!r})") from None
    if not 0 < seconds <= 60:
        raise argparse.ArgumentTypeError("expected seconds from 0 to 60")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacslb",
        description="A load balancer for PACS clusters that understands DICOM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # --version on one line, however long
    )
    from pacslb import compiled

    version = f"pacslb {__version__} (per-request path: {compiled.status()})"
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the balancer in the foreground (SIGHUP reloads, SIGTERM stops)")
    run.add_argument("config", nargs="?", help="config file (YAML); without one, the embedded demo runs")
    run.set_defaults(func=cmd_run, base_port=None, no_persistence=False)

    check = sub.add_parser("check", help="validate a config file: exit 0, or 1 listing every error")
    check.add_argument("config", help="config file (YAML)")
    check.set_defaults(func=cmd_check)

    from pacslb import demo

    demo_parser = sub.add_parser("demo", help="simulated PACS nodes behind the four INFINITT-style services")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=cmd_demo)

    from pacslb.cluster.role import REPORTED_ROLES

    keepalived = sub.add_parser("keepalived", help="print the keepalived.conf of this balancer (cluster.vrrp)")
    keepalived.add_argument("config", help="config file (YAML), with cluster.vrrp and admin sections")
    keepalived.set_defaults(func=cmd_keepalived)
    health = sub.add_parser("health", help="exit 0 when this balancer's admin API says it serves (keepalived)")
    health.add_argument("config", help="config file (YAML): its admin section says where to ask")
    health.add_argument(
        "--timeout", type=_seconds, default=HEALTH_TIMEOUT, metavar="S",
        help=f"seconds to wait for the answer (default {HEALTH_TIMEOUT:g})",
    )  # fmt: skip
    health.set_defaults(func=cmd_health)
    role = sub.add_parser("role", help="tell the running balancer its keepalived role (notify hooks)")
    role.add_argument("config", help="config file (YAML): its admin section says where to tell it")
    role.add_argument("role", choices=REPORTED_ROLES)
    role.set_defaults(func=cmd_role)

    from pacslb.admin import client

    client.add_commands(sub)  # status, drain, halt, online, weight, reload: they talk to the admin API
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
