"""Case (c), new connections per second at concurrency 64, in two forms:

- ``conn``: short TCP connections to two nginx nodes, through pacslb ``mode: tcp`` and HAProxy ``mode tcp``,
  by two clients in turn: wrk with ``Connection: close`` (C; every request on a new connection) and the
  bench's Python client (connect, one HTTP/1.0 request, the answer read to EOF and checked, close).
- ``echo``: short DICOM associations (A-ASSOCIATE, one C-ECHO, A-RELEASE) to two C-ECHO responders, through
  pacslb ``mode: tcp``, pacslb ``mode: dicom`` and HAProxy; every answer is checked, and one real dcmtk
  echoscu association goes through each subject first.

Owns these line-ups and running the bench's load generator (``bench.loadgen``, a separate uvloop process,
64 concurrent loops spread over 16 client addresses 127.0.0.2-17). The client is Python, so it has a
ceiling of its own: the direct row (the same client straight to the nodes, spread over both) shows it.
"""

from __future__ import annotations

import subprocess

from bench import peers
from bench.cases import http
from bench.cases.common import Context, Lineup, Subject, measure_all, run_loadgen
from bench.peers import Node
from bench.report import CaseResult, Comparison, Metric, Target

CONCURRENCY = 64
SOURCES = 16


def loadgen(mode: str, ports: list[int], seconds: float, extra: list[str]) -> dict[str, float]:
    result = run_loadgen(mode, ports, seconds, ["--concurrency", str(CONCURRENCY), "--sources", str(SOURCES), *extra])
    errors = sum(result["errors"].values())
    values = {"rate": float(result["rate"]), "errors": float(errors)}
    if errors:
        values["error_share"] = errors / max(1, errors + result["ok"])
    return values


def _describe(values: dict[str, float]) -> str:
    text = f"{values['rate']:,.0f}/s"
    return text + (f", {values['errors']:.0f} errors" if values.get("errors") else "")


def _error_notes(case: CaseResult) -> None:
    for key, label in case.subjects.items():
        total = sum(run.get("errors", 0.0) for run in case.runs.get(key, []))
        if total:
            case.notes.append(f"{label}: {total:.0f} failed operations over all rounds (not counted in the rate)")


def run_conn(ctx: Context) -> CaseResult:
    seconds = ctx.duration(5.0, 2.0)
    case = CaseResult(
        "conn",
        f"(c) new TCP connections per second: connect, one HTTP request, close; concurrency {CONCURRENCY}, "
        f"{seconds:g} s per client, two nginx nodes",
        [
            Metric("rate_wrk", "conn/s, wrk", digits=0),
            Metric("rate", "conn/s, Python client", digits=0),
        ],
    )
    nodes = [Node("n1", ctx.ports.take()), Node("n2", ctx.ports.take())]
    for node in nodes:
        peers.start_nginx(ctx.procs, node, ctx.workdir)
    lineup = Lineup(ctx, case, nodes)
    lineup.direct(nodes[0].port, "direct (the client straight to both nodes)")
    lineup.pacslb("tcp", "mode: tcp")
    lineup.haproxy("haproxy", "mode tcp")
    lineup.floor("tcp", "uvloop forwarding")
    lineup.start()
    expect: list[str] = []
    for node in nodes:
        expect += ["--expect", peers.nginx_body(node.name)]

    def measure(subject: Subject) -> dict[str, float]:
        ports = [n.port for n in nodes] if subject.kind == "direct" else [subject.port]
        by_wrk = http.wrk(subject.port, seconds, threads=2, connections=CONCURRENCY, close=True)
        values = loadgen("http10", ports, seconds, expect)
        values["rate_wrk"] = by_wrk["rps"]
        values["errors"] += by_wrk["errors"]
        return values

    def describe(values: dict[str, float]) -> str:
        return f"wrk {values['rate_wrk']:,.0f}/s, Python client {_describe(values)}"

    measure_all(ctx, case, lineup.subjects, measure, describe=describe)
    k = lineup.key
    case.comparisons = [
        Comparison("pacslb tcp, workers 1 / HAProxy nbthread 1 (wrk)", "rate_wrk", k("pacslb-tcp@1"), "haproxy@1"),
        Comparison(
            "pacslb tcp / HAProxy, both default (wrk)",
            "rate_wrk",
            k("pacslb-tcp@def"),
            "haproxy@def",
            Target(">=", 0.5),
            "#6",
        ),
        Comparison("pacslb tcp / direct (wrk)", "rate_wrk", k("pacslb-tcp@def"), "direct"),
        Comparison("pacslb tcp, workers 1 / floor (1 process each, wrk)", "rate_wrk", k("pacslb-tcp@1"), "floor"),
        Comparison("floor (1 process) / HAProxy nbthread 1 (wrk)", "rate_wrk", "floor", "haproxy@1"),
        Comparison("pacslb tcp / HAProxy, both default (Python client)", "rate", k("pacslb-tcp@def"), "haproxy@def"),
        Comparison("pacslb tcp / direct (Python client: its ceiling)", "rate", k("pacslb-tcp@def"), "direct"),
    ]
    case.notes.append(
        "direct: wrk goes to node n1 only (one URL), the Python client to both nodes in turn. The wrk figure "
        "counts answered requests, each on its own connection; wrk's non-2xx answers and socket errors, and "
        "the Python client's failed or wrong answers, are counted as errors below."
    )
    _error_notes(case)
    return case


def echoscu_check(port: int) -> tuple[bool, str]:
    argv = [peers.ECHOSCU, "-aet", "BENCH", "-aec", "ANY-SCP", "127.0.0.1", str(port)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False, "echoscu timed out"
    return done.returncode == 0, (done.stdout + done.stderr).strip()[:200]


def run_echo(ctx: Context) -> CaseResult:
    seconds = ctx.duration(5.0, 2.0)
    case = CaseResult(
        "echo",
        f"(c) short DICOM associations per second: A-ASSOCIATE, C-ECHO, A-RELEASE; concurrency {CONCURRENCY}, "
        f"{seconds:g} s, two C-ECHO responders",
        [Metric("rate", "associations/s", digits=0)],
    )
    nodes = [Node("n1", ctx.ports.take()), Node("n2", ctx.ports.take())]
    for node in nodes:
        peers.start_echoscp(ctx.procs, node)
    lineup = Lineup(ctx, case, nodes)
    lineup.direct(nodes[0].port, "direct (the client straight to both responders)")
    lineup.pacslb("tcp", "mode: tcp")
    lineup.pacslb("dicom", "mode: dicom")
    lineup.haproxy("haproxy", "mode tcp")
    lineup.start()
    for subject in lineup.subjects:
        ok, text = echoscu_check(subject.port)
        case.notes.append(f"dcmtk echoscu through {subject.label}: {'success' if ok else 'FAILED: ' + text}")

    def measure(subject: Subject) -> dict[str, float]:
        ports = [n.port for n in nodes] if subject.kind == "direct" else [subject.port]
        return loadgen("echo", ports, seconds, [])

    measure_all(ctx, case, lineup.subjects, measure, describe=_describe)
    k = lineup.key
    case.comparisons = [
        Comparison("pacslb tcp, workers 1 / HAProxy nbthread 1", "rate", k("pacslb-tcp@1"), "haproxy@1"),
        Comparison(
            "pacslb tcp / HAProxy, both default", "rate", k("pacslb-tcp@def"), "haproxy@def", Target(">=", 0.5), "#6"
        ),
        Comparison("pacslb dicom / HAProxy, both default", "rate", k("pacslb-dicom@def"), "haproxy@def"),
        Comparison("pacslb dicom / pacslb tcp (default workers)", "rate", k("pacslb-dicom@def"), k("pacslb-tcp@def")),
        Comparison("pacslb tcp / direct (the client's ceiling)", "rate", k("pacslb-tcp@def"), "direct"),
    ]
    _error_notes(case)
    return case
