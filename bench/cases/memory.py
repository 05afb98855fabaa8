"""Case (e), memory: resident size of each balancer holding 10,000 concurrent idle connections.

Owns: the memory line-up (pacslb ``mode: tcp`` and HAProxy ``mode tcp``, each size), and one measurement:
start the balancer afresh, read its resident size, open the idle connections from 16 client addresses
(``bench.loadgen idle``: each one also opens a connection from the balancer to one of two nginx nodes),
wait until the balancer holds them all (its open file descriptors), read the resident size again, close
everything and stop the balancer. Resident size is VmRSS summed over the balancer's processes (pacslb's
relay workers included), so pages shared by forked processes count once per process; the proportional
size (PSS) is recorded too.

File descriptors bound the count: each proxied connection costs the balancer two, and a process can hold
no more than its hard RLIMIT_NOFILE, which only CAP_SYS_RESOURCE may raise. Where that limit is below what
10,000 connections need, the case holds as many as fit for every subject and reports, beside the
measured figure, the linear extrapolation to 10,000 (the size before plus the measured size per connection).
"""

from __future__ import annotations

import json
import resource
import subprocess
import time

from bench import peers
from bench.cases.common import Context, Lineup, Subject, measure_all
from bench.peers import Node
from bench.procs import BenchError, read_line, tree_fds, tree_pss_kib, tree_rss_kib
from bench.report import CaseResult, Comparison, Metric, Target

TARGET_CONNECTIONS = 10_000
#: File descriptors a balancer needs besides two per connection (listeners, epoll, pipes, logs, workers).
FD_MARGIN = 300
#: How long opening the connections and the balancer taking them all may last.
OPEN_TIMEOUT = 120.0
SETTLE = 1.0


def connection_count() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return min(TARGET_CONNECTIONS, (min(soft, hard) - FD_MARGIN) // 2)


def run(ctx: Context) -> CaseResult:
    count = connection_count()
    case = CaseResult(
        "memory",
        f"(e) memory: resident size with {count:,} concurrent idle connections (tcp mode, two nginx nodes)",
        [
            Metric("rss_mb", f"RSS MB at {count:,}"),
            Metric("rss10k_mb", "RSS MB at 10,000", False),
            Metric("base_mb", "RSS MB before", False),
            Metric("per_conn_kb", "KiB per connection", False, 2),
            Metric("pss_mb", "PSS MB", False),
        ],
    )
    # Lower is better for every memory figure.
    case.metrics = [Metric(m.key, m.label, False, m.digits) for m in case.metrics]
    if count < TARGET_CONNECTIONS:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        case.notes.append(
            f"The hard RLIMIT_NOFILE here is {hard:,} and cannot be raised (no CAP_SYS_RESOURCE), so a one-process "
            f"balancer can hold at most about {(hard - FD_MARGIN) // 2:,} proxied connections: every subject "
            f"held {count:,}; 'RSS MB at 10,000' extrapolates linearly from the measured size per connection."
        )
    nodes = [Node("n1", ctx.ports.take()), Node("n2", ctx.ports.take())]
    for node in nodes:
        peers.start_nginx(ctx.procs, node, ctx.workdir)
    lineup = Lineup(ctx, case, nodes)
    maxconn = count + 100
    lineup.pacslb("tcp", "mode: tcp", maxconn=maxconn)
    lineup.haproxy("haproxy", "mode tcp", maxconn=maxconn)
    # Started one at a time inside each measurement, so each begins fresh and alone.

    def measure(subject: Subject) -> dict[str, float]:
        assert subject.start is not None
        subject.start(subject)
        proc = subject.proc
        assert proc is not None
        client = None
        try:
            time.sleep(SETTLE)
            base_kib = tree_rss_kib(proc.pid)
            base_fds = tree_fds(proc.pid)
            argv = [peers.python(), "-m", "bench.loadgen", "idle", "--port", str(subject.port)]
            argv += ["--count", str(count), "--sources", "16", "--hold", str(OPEN_TIMEOUT + 60)]
            client = ctx.procs.start(
                f"idle-{subject.key.replace('@', '-')}",
                argv,
                env=peers.helper_env(),
                cwd=peers.ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            report = json.loads(read_line(client, OPEN_TIMEOUT))
            if report["open"] < count:
                raise BenchError(f"only {report['open']} of {count} connections opened: {report['failed']}")
            deadline = time.monotonic() + OPEN_TIMEOUT
            want = base_fds + 2 * count
            while tree_fds(proc.pid) < want * 0.99:
                if time.monotonic() > deadline:
                    raise BenchError(f"the balancer holds {tree_fds(proc.pid) - base_fds} sockets, not {2 * count}")
                time.sleep(0.2)
            time.sleep(SETTLE)
            rss_kib = tree_rss_kib(proc.pid)
            pss_kib = tree_pss_kib(proc.pid)
        finally:
            if client is not None:
                if client.popen.stdin is not None:
                    client.popen.stdin.close()
                try:
                    client.popen.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                ctx.procs.stop(client)
            ctx.procs.stop(proc)
        per_conn = (rss_kib - base_kib) / count
        return {
            "rss_mb": rss_kib / 1024,
            "rss10k_mb": (base_kib + per_conn * TARGET_CONNECTIONS) / 1024,
            "base_mb": base_kib / 1024,
            "per_conn_kb": per_conn,
            "pss_mb": pss_kib / 1024,
        }

    def describe(v: dict[str, float]) -> str:
        return f"{v['rss_mb']:.1f} MB ({v['base_mb']:.1f} before, {v['per_conn_kb']:.2f} KiB per connection)"

    measure_all(ctx, case, lineup.subjects, measure, describe=describe, cpu=False)
    k = lineup.key
    metric = "rss_mb" if count >= TARGET_CONNECTIONS else "rss10k_mb"
    case.comparisons = [
        Comparison("pacslb, workers 1 / HAProxy nbthread 1", metric, k("pacslb-tcp@1"), "haproxy@1"),
        Comparison(
            "pacslb / HAProxy, both default", metric, k("pacslb-tcp@def"), "haproxy@def", Target("<=", 2.0), "#6"
        ),
        Comparison("pacslb / HAProxy, both default, as measured", "rss_mb", k("pacslb-tcp@def"), "haproxy@def"),
    ]
    return case
