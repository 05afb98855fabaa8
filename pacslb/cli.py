"""The ``pacslb`` command: run, check, demo, and the operations commands (pacslb/admin/client.py). The only
place that prints for the user and exits.

Exit codes: 0 success, 1 invalid config or failed start, 2 wrong usage (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from pacslb import __version__
from pacslb.config import load_config
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


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _report(exc)
        return 1
    names = ", ".join(f"{n} ({s.mode} {s.listen}, {len(s.servers)} servers)" for n, s in config.services.items())
    print(f"{args.config}: OK: {names}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacslb", description="A load balancer for PACS clusters that understands DICOM."
    )
    parser.add_argument("--version", action="version", version=f"pacslb {__version__}")
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

    from pacslb.admin import client

    client.add_commands(sub)  # status, drain, halt, online, weight, reload: they talk to the admin API
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
