"""The benchmark command: ``python bench/run.py [--cases ...] [--repeat N] [--quick] [--write-docs]``.

Owns the command line and the order of a run: raise the file descriptor limit, ask ``pacslb check`` what
this pacslb accepts, record the machine, run each chosen case in its own process registry (so whatever
a case started is stopped when it ends, even when it fails or the run is interrupted), print the table,
save the raw figures under bench/results/, and with ``--write-docs`` put the table into
docs/performance.md. Cases: bulk (a), dicom and tls (b: C-STORE, plain and over TLS), conn and echo (c),
http (d), memory (e), and the clustered pair (f, bench/ha.py): ha (failover in network namespaces, needs
root; --repeat failovers per pair) and store (the Redis store's cost on new connections).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ha, machine, peers, report
from bench.cases import bulk, connrate, dicom_store, dicom_tls, http, memory
from bench.cases.common import Context
from bench.procs import BenchError, Ports, Processes, file_max, raise_nofile

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "performance.md"
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".cache"

#: name -> (letter in the issue, what it runs, the binaries it needs)
CASES: dict[str, tuple[str, Callable[[Context], report.CaseResult], tuple[str, ...]]] = {
    "bulk": ("a", bulk.run, (peers.IPERF3, peers.HAPROXY)),
    "dicom": ("b", dicom_store.run, (peers.STORESCU, peers.STORESCP, peers.HAPROXY)),
    "tls": ("b", dicom_tls.run, (peers.STORESCU, peers.STORESCP, peers.HAPROXY)),
    "conn": ("c", connrate.run_conn, (peers.NGINX, peers.HAPROXY)),
    "echo": ("c", connrate.run_echo, (peers.ECHOSCU, peers.HAPROXY)),
    "http": ("d", http.run, (peers.WRK, peers.NGINX, peers.HAPROXY)),
    "memory": ("e", memory.run, (peers.NGINX, peers.HAPROXY)),
    "ha": ("f", ha.run_failover, (peers.NGINX, peers.HAPROXY, ha.KEEPALIVED, ha.REDIS)),
    "store": ("f", ha.run_store, (peers.NGINX, ha.REDIS)),
}


def parse_cases(text: str) -> list[str]:
    chosen: list[str] = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        names = [name for name, (letter, _, _) in CASES.items() if item in (name, letter)]
        if not names:
            raise argparse.ArgumentTypeError(f"unknown case {item!r} (known: {', '.join(CASES)} or a-f)")
        chosen += [name for name in names if name not in chosen]
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="pacslb vs HAProxy 2.6 vs direct, side by side in one run (see docs/performance.md).",
    )
    parser.add_argument(
        "--cases",
        type=parse_cases,
        default=list(CASES),
        help=f"comma-separated: {', '.join(CASES)} (or the letters a-f); default: all",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds per case; the median is reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="short durations (2 s instead of 5 s per run)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS.relative_to(ROOT)}")
    parser.add_argument(
        "--http-mode",
        choices=["auto", "tcp", "http"],
        default="auto",
        help="pacslb's mode in the HTTP case; auto = http when `pacslb check` accepts it",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run each pacslb subject once under py-spy (untimed) and note where its time goes",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs of the run")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: started processes get stopped


def run_case(name: str, ctx_args: dict[str, object], workdir: Path) -> report.CaseResult:
    letter, function, needs = CASES[name]
    missing = [tool for tool in needs if not Path(tool).exists()]
    if missing:
        return report.CaseResult(
            name, f"({letter}) {name}", [], error=f"missing {', '.join(missing)}: run `sh bench/install.sh`"
        )
    started = time.monotonic()
    load_at_start = machine.loadavg()
    print(f"bench: [{name}] starting; load average {load_at_start}", file=sys.stderr, flush=True)
    with Processes(workdir / name / "logs") as procs:
        ctx = Context(procs=procs, ports=Ports(), workdir=workdir / name, **ctx_args)  # type: ignore[arg-type]
        try:
            result = function(ctx)
        except (BenchError, OSError, ValueError, KeyError) as exc:
            result = report.CaseResult(name, f"({letter}) {name}", [], error=f"{type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - started
    result.notes.append(
        f"Load average (1 / 5 / 15 min) when the case started: {load_at_start.split(' (')[0]}; "
        f"when it ended: {machine.loadavg().split(' (')[0]}."
    )
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    nofile = raise_nofile()
    command = "python bench/run.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    workdir = Path(tempfile.mkdtemp(prefix="pacslb-bench-"))
    results: list[report.CaseResult] = []
    try:
        caps = peers.probe_capabilities(workdir)
        info = machine.describe(caps)
        info["rounds per case"] = f"{args.repeat} (median shown){', --quick durations' if args.quick else ''}"
        info["load average at start"] = machine.loadavg()
        print(
            f"bench: {len(args.cases)} case(s), {args.repeat} round(s) each; RLIMIT_NOFILE {nofile:,}, "
            f"file-max {file_max():,}; work folder {workdir}",
            file=sys.stderr,
        )
        ctx_args: dict[str, object] = {
            "cache": CACHE,
            "caps": caps,
            "cores": machine.usable_cores(),
            "repeat": args.repeat,
            "quick": args.quick,
            "http_mode": args.http_mode,
            "profile_dir": RESULTS / f"profile-{time.strftime('%Y%m%d-%H%M%S')}" if args.profile else None,
        }
        started = time.monotonic()
        for name in args.cases:
            results.append(run_case(name, ctx_args, workdir))
        info["load average at end"] = machine.loadavg()
        info["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
        info["duration"] = f"{time.monotonic() - started:.0f} s"
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report.full_markdown(info, results, command)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report.write_json(RESULTS / f"{stamp}.json", info, results, command)
    print(f"bench: raw figures in {(RESULTS / f'{stamp}.json').relative_to(ROOT)}", file=sys.stderr)
    if args.write_docs:
        report.write_docs(DOCS, text)
        print(f"bench: table written into {DOCS.relative_to(ROOT)}", file=sys.stderr)
    if args.keep_workdir:
        print(f"bench: configs and logs kept in {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
