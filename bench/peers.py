"""The programs the bench drives: config files for them and how each is started on loopback.

Owns: pacslb configs (YAML) and ``pacslb run``; HAProxy 2.6 configs equivalent to pacslb's (source-IP
stickiness, the same timeouts, no health checks, no logging on either side) and ``haproxy -db``; nginx
nodes serving a small body; iperf3 and storescp servers; the bench's own C-ECHO responder; and the probes
that ask ``pacslb check`` which config keys this pacslb accepts (``workers``, ``mode: http``). Absolute
/usr/bin paths everywhere: pynetdicom installs scripts named like dcmtk's tools earlier on PATH.
It must not measure anything.

The pacslb measured is the one users run: ``pip install .`` of this repository into its own virtual
environment (bench/.cache/venv; the wheel carries the compiled per-request path where a C compiler is
present, setup.py), made again whenever a source changed, and run from outside the repository so that
nothing of the checkout is imported. ``BENCH_PACSLB=checkout`` runs the repository's sources with the
bench's own interpreter instead (what ``make compile`` left in place, e.g. to profile an edit at once).
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.procs import BenchError, Proc, Processes

ROOT = Path(__file__).resolve().parent.parent

HAPROXY = "/usr/sbin/haproxy"
NGINX = "/usr/sbin/nginx"
IPERF3 = "/usr/bin/iperf3"
WRK = "/usr/bin/wrk"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"

#: Connections a balancer accepts at once (pacslb's default; the memory case raises it). HAProxy sizes its
#: file descriptor needs from it (two per connection, more with splicing) and refuses to start when the
#: hard RLIMIT_NOFILE is lower, so it must stay well under that limit.
MAXCONN = 4096
#: The body nginx serves: small, as a viewer's many small requests are; its last line is what clients check.
BODY_PAD = 100


@dataclass(frozen=True)
class Node:
    name: str
    port: int


@dataclass(frozen=True)
class Capabilities:
    """What this pacslb's config accepts (asked of ``pacslb check`` once per run)."""

    workers: bool
    http_mode: bool


def python() -> str:
    """The interpreter that runs pacslb and the bench's helpers (the one running the bench)."""
    return sys.executable


def helper_env() -> dict[str, str]:
    """Environment for ``python -m bench.*`` and ``python -m pacslb``: the repository first on the path."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


#: Where ``pip install .`` puts the pacslb under test (bench/.cache is not committed).
INSTALLED = ROOT / "bench" / ".cache" / "venv"
#: What the installed copy is made from: when any of these changed, it is installed again.
INSTALL_SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "tools/pacslb_backend.py")
#: pip builds the wheel (mypyc type-checks and compiles the per-request path: about a minute, more when
#: the machine is busy) and installs the dependencies.
INSTALL_TIMEOUT = 900


def _checkout() -> bool:
    return os.environ.get("BENCH_PACSLB", "installed") == "checkout"


def _fingerprint() -> str:
    digest = hashlib.sha256(f"PACSLB_COMPILE={os.environ.get('PACSLB_COMPILE', '')}".encode())
    files = [ROOT / name for name in INSTALL_SOURCES] + sorted((ROOT / "pacslb").rglob("*"))
    for path in files:
        if path.is_file() and path.suffix not in (".pyc", ".so") and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def install_pacslb() -> str:
    """``pip install .`` into INSTALLED unless it holds these very sources already; its interpreter."""
    python = INSTALLED / "bin" / "python"
    stamp = INSTALLED / ".fingerprint"
    wanted = _fingerprint()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return str(python)
    print(f"bench: pip install . into {INSTALLED.relative_to(ROOT)} (the sources changed)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(INSTALLED)], check=True, timeout=120)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT
    )
    if done.returncode != 0:
        raise BenchError(f"pip install . failed:\n{(done.stdout + done.stderr)[-2000:]}")
    stamp.write_text(wanted)
    return str(python)


_pacslb_python: str | None = None


def pacslb_python() -> str:
    """The interpreter that runs the pacslb under test (installing it first when needed)."""
    global _pacslb_python
    if _pacslb_python is None:
        _pacslb_python = python() if _checkout() else install_pacslb()
    return _pacslb_python


def pacslb_env() -> dict[str, str]:
    """Environment for ``python -m pacslb``: the checkout first on the path, or nothing of it."""
    return helper_env() if _checkout() else {"PYTHONPATH": ""}


def pacslb_cwd(workdir: Path) -> Path:
    """Where pacslb runs: ``python -m`` puts its directory first on the path, so not the checkout's root
    when the installed copy is measured."""
    return ROOT if _checkout() else workdir


def pacslb_version() -> str:
    """What ``pacslb --version`` of the pacslb under test says (its compiled path included), and where it is."""
    done = subprocess.run(
        [pacslb_python(), "-m", "pacslb", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=pacslb_cwd(Path("/")),
        env=dict(os.environ) | pacslb_env(),
    )
    where = "the checkout's sources" if _checkout() else f"pip install . in {INSTALLED.relative_to(ROOT)}"
    return f"{(done.stdout + done.stderr).strip().removeprefix('pacslb ')}, {where}"


def pacslb_check(config: dict[str, Any], workdir: Path) -> tuple[bool, str]:
    """Run ``python -m pacslb check`` on ``config``; (accepted, its output)."""
    path = workdir / "probe.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ) | pacslb_env()
    done = subprocess.run(
        [pacslb_python(), "-m", "pacslb", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=pacslb_cwd(workdir),
        env=env,
    )
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def probe_capabilities(workdir: Path) -> Capabilities:
    service = {"listen": "127.0.0.1:1", "check": {"type": "none"}, "servers": {"n1": "127.0.0.1:2"}}
    workers, _ = pacslb_check({"workers": 1, "services": {"s": service}}, workdir)
    http = dict(service, mode="http", persistence={"type": "cookie+source_ip"})
    http_mode, _ = pacslb_check({"services": {"s": http}}, workdir)
    return Capabilities(workers=workers, http_mode=http_mode)


def pacslb_config(
    port: int,
    nodes: list[Node],
    *,
    mode: str = "tcp",
    persistence: dict[str, Any] | None = None,
    workers: int | None = None,
    maxconn: int = MAXCONN,
    log_level: str = "warning",
) -> dict[str, Any]:
    """One service on ``127.0.0.1:port`` in front of ``nodes``, like the INFINITT services but unchecked."""
    service: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "mode": mode,
        "balance": "leastconn",
        "persistence": persistence if persistence is not None else {"type": "source_ip", "timeout": "30m"},
        "check": {"type": "none"},
        "maxconn": maxconn,
        "timeouts": {"connect": "5s", "client_idle": "12h", "server_idle": "12h"},
        # Every load generator connects from one address, faster than any hospital client: the per-client
        # limits would measure themselves, and HAProxy's config has none.
        "limits": {"client_maxconn": "none", "client_rate": "none"},
        "servers": {node.name: f"127.0.0.1:{node.port}" for node in nodes},
    }
    # No connection log lines (HAProxy's config has no log either); a short grace so stopping is quick.
    config: dict[str, Any] = {"log": {"format": "text", "level": log_level}, "shutdown_grace": "1s"}
    if workers is not None:
        config["workers"] = workers
    config["services"] = {"bench": service}
    return config


def start_pacslb(
    procs: Processes, name: str, config: dict[str, Any], port: int, workdir: Path, *, relay: str = "splice"
) -> Proc:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = pacslb_env() | {"PACSLB_RELAY": relay}
    proc = procs.start(name, [pacslb_python(), "-m", "pacslb", "run", str(path)], env=env, cwd=pacslb_cwd(workdir))
    procs.wait_listening(proc, port)
    return proc


def haproxy_config(
    port: int,
    nodes: list[Node],
    *,
    nbthread: int | None = None,
    mode: str = "tcp",
    splice: str | None = None,
    maxconn: int = MAXCONN,
) -> str:
    """An HAProxy config equivalent to ``pacslb_config``: stick on source, leastconn, no checks, no log.

    ``mode="http"`` is the web service of the INFINITT layout: cookie insert with a source-IP fallback.
    ``splice`` is None (HAProxy's default: no splicing), ``"auto"`` (option splice-auto) or ``"forced"``
    (option splice-request and splice-response).
    """
    lines = ["global", f"    maxconn {maxconn}"]
    if nbthread:
        lines.append(f"    nbthread {nbthread}")
    lines += [
        "defaults",
        "    timeout connect 5s",
        "    timeout client 12h",
        "    timeout server 12h",
        "    timeout http-request 30s",
        "    timeout http-keep-alive 12h",
        f"    maxconn {maxconn}",
        "listen bench",
        f"    bind 127.0.0.1:{port}",
    ]
    if mode == "http":
        lines += ["    mode http", "    balance roundrobin", "    cookie SERVERID insert indirect nocache"]
    else:
        lines += ["    mode tcp", "    balance leastconn"]
    lines += ["    stick-table type ip size 100k expire 30m", "    stick on src"]
    if splice == "auto":
        lines.append("    option splice-auto")
    elif splice == "forced":
        lines += ["    option splice-request", "    option splice-response"]
    for n in nodes:
        lines.append(f"    server {n.name} 127.0.0.1:{n.port}" + (f" cookie {n.name}" if mode == "http" else ""))
    return "\n".join(lines) + "\n"


def start_haproxy(procs: Processes, name: str, config: str, port: int, workdir: Path) -> Proc:
    path = workdir / f"{name}.cfg"
    path.write_text(config)
    check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(path)], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise BenchError(f"haproxy refused {path}:\n{check.stdout}{check.stderr}")
    proc = procs.start(name, [HAPROXY, "-db", "-f", str(path)])
    procs.wait_listening(proc, port)
    return proc


def nginx_body(node: str) -> str:
    """What node ``node`` answers: padded to a fixed small size, ending in a line naming the node."""
    last = f"served by {node}\n"
    return "x" * (BODY_PAD - len(last) - 1) + "\n" + last


def start_nginx(procs: Processes, node: Node, workdir: Path) -> Proc:
    """An nginx node answering every request with ``nginx_body`` (keep-alive unbounded, no access log)."""
    prefix = workdir / f"nginx-{node.name}"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    body = nginx_body(node.name).replace("\n", "\\n")
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    conf = prefix / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            worker_processes 1;
            daemon off;
            pid {prefix}/nginx.pid;
            error_log {prefix}/error.log warn;
            worker_rlimit_nofile {nofile};
            events {{ worker_connections {nofile - 100}; }}
            http {{
                access_log off;
                client_body_temp_path {prefix}/tmp/body;
                proxy_temp_path {prefix}/tmp/proxy;
                fastcgi_temp_path {prefix}/tmp/fastcgi;
                uwsgi_temp_path {prefix}/tmp/uwsgi;
                scgi_temp_path {prefix}/tmp/scgi;
                keepalive_requests 10000000;
                keepalive_timeout 1h;
                client_header_timeout 1h;
                server {{
                    listen 127.0.0.1:{node.port} backlog=4096;
                    location / {{
                        default_type text/plain;
                        return 200 "{body}";
                    }}
                }}
            }}
            """
        )
    )
    proc = procs.start(
        f"nginx-{node.name}", [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    )
    procs.wait_listening(proc, node.port)
    return proc


def start_iperf3(procs: Processes, name: str, port: int) -> Proc:
    """An iperf3 server for exactly one test (``-1``): a fresh one per measurement cannot be left busy."""
    proc = procs.start(name, [IPERF3, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)])
    procs.wait_listening(proc, port)
    return proc


def start_storescp(
    procs: Processes, name: str, port: int, outdir: Path | None, *, env: dict[str, str] | None = None
) -> Proc:
    """dcmtk's storescp: ``--ignore`` (receive, do not store) when ``outdir`` is None, else store there."""
    argv = [STORESCP, "-aet", "STORESCP", "-pdu", "131072"]
    argv += ["--ignore"] if outdir is None else ["--output-directory", str(outdir)]
    proc = procs.start(name, [*argv, str(port)], env=env)
    procs.wait_listening(proc, port)
    return proc


def start_echoscp(procs: Processes, node: Node) -> Proc:
    proc = procs.start(
        f"echoscp-{node.name}", [python(), "-m", "bench.echoscp", "--port", str(node.port)], env=helper_env(), cwd=ROOT
    )
    procs.wait_listening(proc, node.port)
    return proc
