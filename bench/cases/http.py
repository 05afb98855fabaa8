"""Case (d), HTTP keep-alive: wrk (``-t2 -c50 --latency``) against two nginx nodes: requests/s, p50 and p99
at full load; then the latency at a moderate load (``bench.loadgen paced``: a fixed request rate, open loop).

Owns: the HTTP line-up and reading wrk's report. pacslb runs in ``mode: http`` with
``persistence: {type: cookie+source_ip}`` when this pacslb's ``check`` accepts it (``--http-mode auto``),
else in ``mode: tcp`` with source-IP persistence; HAProxy runs ``mode http`` with
``cookie SERVERID insert indirect nocache`` and ``stick on src`` (the INFINITT web service), and, while
pacslb is in tcp mode, also ``mode tcp`` as the like-for-like reference. Before timing, one request through
each subject is checked (status 200, a node's body, and the persistence cookie where the mode sets one).
"""

from __future__ import annotations

import re
import subprocess

import httpx

from bench import peers
from bench.cases.common import Context, Lineup, Subject, measure_all, run_loadgen
from bench.peers import Node
from bench.procs import BenchError
from bench.report import CaseResult, Comparison, Metric, Target

THREADS = 2
CONNECTIONS = 50
#: The moderate load: requests per second in all, over this many keep-alive connections. About a seventh
#: of what pacslb serves on one core here, a thirtieth of HAProxy's.
PACED_RATE = 1000
PACED_CONNECTIONS = 10
#: Beyond the run's duration, how long wrk may take to connect and report.
WRK_SLACK = 30.0
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(text: str) -> dict[str, float]:
    rps = _RPS.search(text)
    latencies = {pct: float(value) * _UNITS[unit] for pct, value, unit in _LATENCY.findall(text)}
    if rps is None or "50" not in latencies or "99" not in latencies:
        raise BenchError(f"could not read wrk's report: {text.strip()[-300:]}")
    values = {"rps": float(rps.group(1)), "p50": latencies["50"], "p99": latencies["99"]}
    errors = 0
    if match := _NON2XX.search(text):
        errors += int(match.group(1))
    if match := _SOCKET_ERRORS.search(text):
        errors += sum(int(g) for g in match.groups())
    values["errors"] = float(errors)
    return values


def wrk(
    port: int, seconds: float, *, threads: int = THREADS, connections: int = CONNECTIONS, close: bool = False
) -> dict[str, float]:
    """Run wrk against ``port``; ``close`` sends ``Connection: close``, so every request is a new connection."""
    argv = [peers.WRK, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + WRK_SLACK)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + WRK_SLACK:.0f}s") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()[:300]}")
    return parse_wrk(done.stdout)


def paced(port: int, seconds: float) -> dict[str, float]:
    """p50 and p99 (ms) at :data:`PACED_RATE` requests/s, from the bench's load generator."""
    extra = ["--rate", str(PACED_RATE), "--concurrency", str(PACED_CONNECTIONS), "--sources", "1"]
    result = run_loadgen("paced", [port], seconds, extra)
    errors = float(sum(result["errors"].values()))
    return {"p50m": float(result["p50"]), "p99m": float(result["p99"]), "paced_errors": errors}


def check_once(port: int, nodes: list[Node], cookie: bool) -> tuple[bool, str]:
    """One request: status 200, a node's body, and (``cookie``) a SERVERID cookie naming a node."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    bodies = {peers.nginx_body(node.name) for node in nodes}
    if response.status_code != 200 or response.text not in bodies:
        return False, f"status {response.status_code}, body {response.text[-40:]!r}"
    if cookie and "SERVERID" not in response.cookies:
        return False, "no SERVERID cookie"
    return True, "200, a node's body" + (", SERVERID cookie set" if cookie else "")


def run(ctx: Context) -> CaseResult:
    seconds = ctx.duration(5.0, 2.0)
    pacslb_mode = ctx.http_mode if ctx.http_mode != "auto" else ("http" if ctx.caps.http_mode else "tcp")
    case = CaseResult(
        "http",
        f"(d) HTTP keep-alive: wrk -t{THREADS} -c{CONNECTIONS} -d{seconds:g}s --latency, two nginx nodes, "
        f"{peers.BODY_PAD}-byte body",
        [
            Metric("rps", "requests/s", digits=0),
            Metric("p50", "p50 ms", False, 3),
            Metric("p99", "p99 ms", False, 3),
            Metric("p50m", f"p50 ms at {PACED_RATE:,} req/s", False, 3),
            Metric("p99m", f"p99 ms at {PACED_RATE:,} req/s", False, 3),
        ],
    )
    nodes = [Node("n1", ctx.ports.take()), Node("n2", ctx.ports.take())]
    for node in nodes:
        peers.start_nginx(ctx.procs, node, ctx.workdir)
    lineup = Lineup(ctx, case, nodes)
    lineup.direct(nodes[0].port, "direct (wrk straight to one node)")
    if pacslb_mode == "http":
        persistence = {"type": "cookie+source_ip", "cookie": "SERVERID", "timeout": "30m"}
        lineup.pacslb("http", "mode: http, cookie+source_ip", mode="http", persistence=persistence)
        variant = "http"
    else:
        lineup.pacslb("tcp", "mode: tcp, source_ip", mode="tcp")
        variant = "tcp"
    lineup.haproxy("haproxy-http", "mode http, cookie insert + stick on src", mode="http")
    lineup.floor("http", "uvloop + httptools forwarding, both directions parsed")
    if pacslb_mode == "tcp":
        lineup.haproxy("haproxy-tcp", "mode tcp, stick on src", mode="tcp")
    lineup.start()
    for subject in lineup.subjects:
        cookie = subject.key.startswith("haproxy-http") or (subject.kind == "pacslb" and pacslb_mode == "http")
        ok, text = check_once(subject.port, nodes, cookie)
        case.notes.append(f"one request through {subject.label}: {'ok' if ok else 'FAILED'}: {text}")

    def measure(subject: Subject) -> dict[str, float]:
        return wrk(subject.port, seconds)

    def measure_paced(subject: Subject) -> dict[str, float]:
        return paced(subject.port, seconds)

    def describe(v: dict[str, float]) -> str:
        text = f"{v['rps']:,.0f} req/s, p50 {v['p50']:.3f} ms, p99 {v['p99']:.3f} ms"
        text += f"; at {PACED_RATE:,} req/s p50 {v['p50m']:.3f} ms, p99 {v['p99m']:.3f} ms"
        return text + (f", {v['errors']:.0f} errors" if v.get("errors") else "")

    measure_all(ctx, case, lineup.subjects, measure, describe=describe, then=measure_paced)
    k = lineup.key
    p = f"pacslb-{variant}"
    case.comparisons = [
        Comparison(f"pacslb {variant}, workers 1 / HAProxy http, nbthread 1", "rps", k(f"{p}@1"), "haproxy-http@1"),
        Comparison(
            f"pacslb {variant} / HAProxy http, both default",
            "rps",
            k(f"{p}@def"),
            "haproxy-http@def",
            Target(">=", 0.5),
            "#3, #6",
        ),
        Comparison(f"pacslb {variant} / direct", "rps", k(f"{p}@def"), "direct"),
        Comparison(f"pacslb {variant}, workers 1 / floor (1 process each)", "rps", k(f"{p}@1"), "floor"),
        Comparison("floor (1 process) / HAProxy http, nbthread 1", "rps", "floor", "haproxy-http@1"),
        Comparison(
            f"pacslb {variant} p99 minus direct p99 (moderate load, {PACED_RATE:,} req/s)",
            "p99m",
            k(f"{p}@def"),
            "direct",
            Target("<=", 1.0),
            "#3",
            kind="diff",
        ),
        Comparison(
            f"HAProxy http p99 minus direct p99 (moderate load, {PACED_RATE:,} req/s)",
            "p99m",
            "haproxy-http@def",
            "direct",
            kind="diff",
        ),
        Comparison(f"pacslb {variant} p99 minus direct p99 (full load)", "p99", k(f"{p}@def"), "direct", kind="diff"),
    ]
    if pacslb_mode == "tcp":
        case.comparisons.insert(
            2, Comparison("pacslb tcp / HAProxy tcp, both default", "rps", k(f"{p}@def"), "haproxy-tcp@def")
        )
        case.notes.append(
            "pacslb ran in mode: tcp (this pacslb's check does not accept mode: http yet): it relays bytes, "
            "HAProxy http parses every request and sets a cookie, so the http ratio flatters pacslb; the "
            "HAProxy tcp row is the like-for-like one."
        )
    for key, label in case.subjects.items():
        total = sum(run.get("errors", 0.0) for run in case.runs.get(key, []))
        if total:
            case.notes.append(f"{label}: wrk counted {total:.0f} errors (non-2xx answers or socket errors)")
        paced_errors = sum(run.get("paced_errors", 0.0) for run in case.runs.get(key, []))
        if paced_errors:
            case.notes.append(f"{label}: the paced load counted {paced_errors:.0f} errors")
    case.notes.append(
        f"Moderate load: {PACED_RATE:,} requests/s over {PACED_CONNECTIONS} keep-alive connections from the "
        "bench's Python load generator (open loop; a request sent late because the answer before it was late "
        "is timed from when it was due). Its own wakeups add to every subject alike; wrk's p99 is at full load."
    )
    return case
