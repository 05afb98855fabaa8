"""Running the demo: the balancer config it builds, the banner telling a newcomer what to try, and the
``pacslb demo`` entry points (start the nodes, run the real engine, stop everything)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from pacslb.config import Config, load_config_text
from pacslb.errors import PacslbError
from pacslb.logs import log_event, setup_logging

if TYPE_CHECKING:
    pass

from pacslb.demo.archive import Archive, write_demo_study
from pacslb.demo.layout import (
    BALANCER_AE,
    CHECK_CALLING_AE,
    CHECK_INTERVAL,
    CHECK_TIMEOUT,
    DEFAULT_BASE_PORT,
    DEMO_STUDY_INSTANCES,
    HOST,
    MAX_BASE_PORT,
    MIN_BASE_PORT,
    NODE_COUNT,
    NODE_HTTP_OFFSET,
    PERSISTENCE_TIMEOUT,
    SHUTDOWN_GRACE,
    DemoPorts,
)
from pacslb.demo.nodes import SimulatedNode, stop_nodes

log = logging.getLogger("pacslb.demo")

# -- the balancer config -----------------------------------------------------------------------------


def build_config_text(ports: DemoPorts, persistence: str) -> str:
    """The YAML config of the four services in front of the simulated nodes.

    Args:
        ports: the demo's ports.
        persistence: "source_ip" or "none".
    """
    nodes = range(1, NODE_COUNT + 1)
    dicom_servers = {f"pacs{i}": f"{HOST}:{ports.node_dicom(i)}" for i in nodes}
    web_servers = {f"pacs{i}": f"{HOST}:{ports.node_http(i)}" for i in nodes}
    sticky: dict[str, str] = {"type": persistence}
    if persistence != "none":
        sticky["timeout"] = PERSISTENCE_TIMEOUT
    timing = {"interval": CHECK_INTERVAL, "timeout": CHECK_TIMEOUT}
    echo_check = {"type": "dicom_echo", "calling_ae": CHECK_CALLING_AE, "called_ae": "ANY-SCP", **timing}
    web_check = {"type": "http", "method": "GET", "path": "/status", "expect_status": [200], **timing}

    def service(name: str, mode: str, check: dict[str, Any], servers: dict[str, str]) -> dict[str, Any]:
        persistence = dict(sticky)
        if mode == "http" and persistence["type"] != "none":
            persistence["type"] = "cookie+source_ip"  # the INFINITT web service: cookie, source IP as fallback
        return {
            "listen": f"{HOST}:{ports.service(name)}",
            "mode": mode,
            "balance": "leastconn",
            "persistence": persistence,
            "check": dict(check),
            "servers": dict(servers),
        }

    config = {
        "services": {
            "web": service("web", "http", web_check, web_servers),
            "dicom": service("dicom", "dicom", echo_check, dicom_servers),
            "query": service("query", "dicom", echo_check, dicom_servers),
            "mwl": service("mwl", "dicom", echo_check, dicom_servers),
        },
        "admin": {"listen": f"{HOST}:{ports.admin()}"},
        "log": {"format": "text", "level": "info"},
        "shutdown_grace": SHUTDOWN_GRACE,
    }
    return yaml.safe_dump(config, sort_keys=False)


# -- the banner --------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """``path`` as typed in a shell in the current directory: relative below it, absolute elsewhere."""
    try:
        text = str(path.relative_to(Path.cwd()))
    except ValueError:
        return shlex.quote(str(path))
    return shlex.quote(text if "/" in text else f"./{text}")


def own_commands() -> tuple[str, str]:
    """How to run this pacslb and the Python that has pynetdicom, as typed in a *new* shell in the current
    directory, where no virtual environment is active: ``.venv/bin/pacslb`` and ``.venv/bin/python`` after
    ``make demo``; plain ``pacslb`` only where that name on PATH is this very command, outside a venv."""
    python = Path(sys.executable)
    script = python.parent / "pacslb"
    in_venv = sys.prefix != sys.base_prefix
    on_path = shutil.which("pacslb")
    if not in_venv and on_path and script.exists() and Path(on_path).resolve() == script.resolve():
        pacslb = "pacslb"
    elif script.exists():
        pacslb = _shown(script)
    else:
        pacslb = f"{_shown(python)} -m pacslb"
    return pacslb, _shown(python)


def banner(ports: DemoPorts, nodes: Iterable[SimulatedNode], study_dir: Path, persistence: str) -> str:
    """What the user reads once the balancer listens. The first line says "ready" (tests wait for it).

    Every indented line that starts with a command works as printed when pasted into a new shell in the
    directory the demo was started from (tests/integration/test_demo.py pastes them); dcmtk's tools get
    ``-v`` so that a success shows something.
    """
    web, dicom, query, mwl = (ports.service(n) for n in ("web", "dicom", "query", "mwl"))
    files = f"{shlex.quote(str(study_dir))}/*.dcm"
    sticky = f"source_ip, {PERSISTENCE_TIMEOUT}" if persistence != "none" else "none"
    pacslb, python = own_commands()
    admin = f"http://{HOST}:{ports.admin()}"
    lines = [
        f"pacslb demo ready: 4 services in front of {NODE_COUNT} simulated PACS nodes. Ctrl-C stops it.",
        "",
        f"Services on {HOST} (balance leastconn, persistence {sticky}, checks every {CHECK_INTERVAL}):",
        f"  web    {HOST}:{web:<6} mode http: viewer stand-in  (check: GET /status)",
        f"  dicom  {HOST}:{dicom:<6} mode dicom: C-ECHO, C-STORE (check: C-ECHO)",
        f"  query  {HOST}:{query:<6} mode dicom: C-FIND          (check: C-ECHO)",
        f"  mwl    {HOST}:{mwl:<6} mode dicom: worklist C-FIND (check: C-ECHO)",
        "  (mode dicom reads each association's request: a node that is down, busy or hung is skipped before",
        "  the modality notices, and with no node left it is told to retry later, rather than cut off.)",
        f"Dashboard: {admin}/",
        "Nodes (one shared archive, as in a real cluster):",
        *(f"  {n.name}  AE {n.ae_title}  DICOM {HOST}:{n.dicom_port}  web http://{HOST}:{n.http_port}/" for n in nodes),
        f"Demo study: {DEMO_STUDY_INSTANCES} CT images in {study_dir}",
        "",
        f"Try, in another shell in this directory (dcmtk: apt install dcmtk; any called AE title works, {BALANCER_AE}"
        " here):",
        f"  echoscu -v -aec {BALANCER_AE} {HOST} {dicom}",
        f"  storescu -v -aec {BALANCER_AE} {HOST} {dicom} {files}",
        f"  findscu -v -S -aec {BALANCER_AE} -k QueryRetrieveLevel=STUDY -k StudyInstanceUID -k PatientName "
        f"{HOST} {query}",
        f'  findscu -v -W -aec {BALANCER_AE} -k PatientName -k "ScheduledProcedureStepSequence[0].Modality=CT" '
        f"{HOST} {mwl}",
        f"  curl -i http://{HOST}:{web}/",
        f"  {pacslb} status --admin {admin}",
        "Without dcmtk, pynetdicom's apps take the same options, e.g.",
        f"  {python} -m pynetdicom echoscu -v -aec {BALANCER_AE} {HOST} {dicom}",
        "",
    ]
    if persistence != "none":
        lines += [
            "Persistence is source_ip (the web service: a cookie, then source_ip): every connection from this",
            "machine lands on the node it reached first, per service. The log below names the node that",
            "answered each request, as does the page.",
            "To watch leastconn spread connections over the nodes instead, stop this one (Ctrl-C), then:",
            f"  {pacslb} demo --no-persistence",
        ]
    else:
        lines += [
            "Persistence is off (--no-persistence): each new connection goes to the node with the fewest",
            "connections, so repeated echoscu or curl runs move between nodes; the log below shows which.",
        ]
    return "\n".join(lines)


# -- entry points ------------------------------------------------------------------------------------


def _base_port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not MIN_BASE_PORT <= value <= MAX_BASE_PORT:
        raise argparse.ArgumentTypeError(
            f"must be between {MIN_BASE_PORT} and {MAX_BASE_PORT} (the demo uses ports up to base+"
            f"{NODE_HTTP_OFFSET + NODE_COUNT})"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to its subcommand parser."""
    parser.add_argument(
        "--base-port",
        type=_base_port,
        default=DEFAULT_BASE_PORT,
        metavar="PORT",
        help=f"services listen on PORT+80 (web), +104 (dicom), +105 (query), +204 (mwl); nodes on "
        f"PORT+1101.. (DICOM) and PORT+1181.. (HTTP); default {DEFAULT_BASE_PORT}",
    )
    parser.add_argument(
        "--no-persistence",
        action="store_true",
        help="balance every new connection (persistence none) instead of keeping a client on its node",
    )


def _stop_during_startup(signum: int, frame: FrameType | None) -> NoReturn:
    # Until the engine installs its own handlers, SIGTERM would kill the process before the nodes are
    # stopped and the temporary directory removed; turn it into an exception the cleanup runs after.
    raise KeyboardInterrupt


def _run(config: Config, on_ready: Callable[[], None]) -> None:
    from pacslb.engine import serve

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency wherever it builds
        runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner:
        runner.run(serve(config, None, on_ready=on_ready))


def main(args: argparse.Namespace) -> int:
    """Run the demo until SIGINT or SIGTERM.

    Returns:
        The exit code: 0 after a clean stop, 1 when the demo cannot start (a port is taken).
    """
    setup_logging()
    # `pacslb run` without a config comes here too, with base_port None.
    base = getattr(args, "base_port", None) or DEFAULT_BASE_PORT
    persistence = "none" if getattr(args, "no_persistence", False) else "source_ip"
    ports = DemoPorts(base)
    # signal.signal only works in the main thread; called elsewhere (embedding), the engine's own
    # handlers are all there is.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_during_startup) if in_main_thread else None
    workdir = Path(tempfile.mkdtemp(prefix="pacslb-demo-"))
    archive = Archive()
    nodes = [SimulatedNode(i, ports, archive) for i in range(1, NODE_COUNT + 1)]
    try:
        study_dir = workdir / "study"
        study_uid = write_demo_study(study_dir)
        log_event(log, "demo_study", directory=str(study_dir), study=study_uid, instances=DEMO_STUDY_INSTANCES)
        for node in nodes:
            try:
                node.start()
            except OSError as exc:
                log_event(
                    log,
                    "demo_start_failed",
                    logging.ERROR,
                    node=node.name,
                    dicom_port=node.dicom_port,
                    http_port=node.http_port,
                    reason=exc.strerror or str(exc),
                    hint="choose other ports with --base-port",
                )
                return 1
            log_event(
                log,
                "node_started",
                node=node.name,
                ae_title=node.ae_title,
                dicom_port=node.dicom_port,
                http_port=node.http_port,
            )
        config = load_config_text(build_config_text(ports, persistence), "<demo>")
        text = banner(ports, nodes, study_dir, persistence)

        def on_ready() -> None:
            print(text, flush=True)

        try:
            _run(config, on_ready)
        except PacslbError as exc:  # e.g. the engine's StartError: a service port is taken
            log_event(
                log,
                "demo_start_failed",
                logging.ERROR,
                reason=str(exc),
                hint="choose other ports with --base-port",
            )
            return 1
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM before the engine ran: a normal stop
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        stop_nodes(nodes)
        shutil.rmtree(workdir, ignore_errors=True)
        log_event(log, "demo_stopped")
    return 0
