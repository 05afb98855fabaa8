"""Case (a), bulk TCP throughput: one iperf3 stream through each subject, in Gbit/s.

Owns: the iperf3 line-up (direct; pacslb with the splice and the buffered relay; HAProxy by default, with
``option splice-auto`` and with forced splicing) and reading iperf3's JSON. A fresh one-test iperf3 server
(``-s -1``) per measurement, so a test that went wrong cannot leave the server busy for the next one. The
first second (TCP slow start, the balancer's connect) is left out with ``-O 1``.
"""

from __future__ import annotations

import json
import subprocess

from bench import peers
from bench.cases.common import Context, Lineup, Subject, measure_all
from bench.peers import Node
from bench.procs import BenchError
from bench.report import CaseResult, Comparison, Metric, Target

KEY = "bulk"
#: Beyond the test's own duration, how long iperf3 may take to connect, finish and report.
IPERF_SLACK = 20.0


def iperf3_client(port: int, seconds: float, omit: int) -> dict[str, float]:
    argv = [peers.IPERF3, "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J"]
    if omit:
        argv += ["-O", str(omit)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + omit + IPERF_SLACK)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"iperf3 did not finish within {seconds + omit + IPERF_SLACK:.0f}s") from exc
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise BenchError(f"iperf3 printed no report (exit {done.returncode}): {done.stderr.strip()[:200]}") from exc
    if "error" in report:
        raise BenchError(f"iperf3: {report['error']}")
    received = report["end"]["sum_received"]
    sent = report["end"]["sum_sent"]
    return {
        "gbps": received["bits_per_second"] / 1e9,
        "bytes_sent": float(sent["bytes"]),
        "bytes_received": float(received["bytes"]),
        "retransmits": float(sent.get("retransmits", 0)),
    }


def run(ctx: Context) -> CaseResult:
    seconds = ctx.duration(5.0, 2.0)
    omit = 0 if ctx.quick else 1
    case = CaseResult(
        KEY,
        f"(a) bulk TCP throughput: iperf3, one stream, {seconds:g} s{' after 1 s omitted' if omit else ''}",
        [Metric("gbps", "Gbit/s", digits=2)],
    )
    port = ctx.ports.take()
    lineup = Lineup(ctx, case, [Node("iperf", port)])
    lineup.direct(port)
    lineup.pacslb("splice", "splice relay", relay="splice")
    lineup.pacslb("buffered", "buffered relay", relay="buffered")
    lineup.haproxy("haproxy")
    lineup.haproxy("haproxy-splice-auto", "option splice-auto", splice="auto", sizes=("def",))
    lineup.haproxy("haproxy-splice", "forced splice (splice-request + splice-response)", splice="forced")
    lineup.start()

    def measure(subject: Subject) -> dict[str, float]:
        server = peers.start_iperf3(ctx.procs, f"iperf3-{port}", port)
        try:
            return iperf3_client(subject.port, seconds, omit)
        finally:
            ctx.procs.stop(server)

    measure_all(ctx, case, lineup.subjects, measure, describe=lambda v: f"{v['gbps']:.2f} Gbit/s")
    k = lineup.key
    case.comparisons = [
        Comparison("pacslb splice, workers 1 / HAProxy nbthread 1", "gbps", k("pacslb-splice@1"), "haproxy@1"),
        Comparison(
            "pacslb splice / HAProxy, both default",
            "gbps",
            k("pacslb-splice@def"),
            "haproxy@def",
            Target(">=", 1.5),
            "#6",
        ),
        Comparison("pacslb splice / direct", "gbps", k("pacslb-splice@def"), "direct", Target(">=", 0.8), "#6"),
        Comparison(
            "pacslb splice / HAProxy forced splice, both default", "gbps", k("pacslb-splice@def"), "haproxy-splice@def"
        ),
        Comparison("pacslb buffered / HAProxy, both default", "gbps", k("pacslb-buffered@def"), "haproxy@def"),
    ]
    case.notes.append(
        "iperf3 reports the bytes it received; a relay that lost or cut bytes would make iperf3 fail or hang, "
        "which the bench reports as a failed run."
    )
    return case
