"""What every case shares: the run context, the line-up of subjects (direct, pacslb, HAProxy) and the loop
that measures each subject in turn, repetition after repetition.

Owns: ``Context`` (processes, ports, work folder, what pacslb accepts, durations), ``Lineup`` (declares the
subjects of a case, starts the balancers, names pacslb's subjects by worker count) and ``measure_all``
(interleaves subjects within each repetition, rotating the order, so that a load change on the machine
hits every subject alike). It must not know what a case measures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import peers, profiling
from bench.peers import Capabilities, Node
from bench.procs import BenchError, Ports, Proc, Processes, tree_cpu_seconds
from bench.report import CaseResult, Metric

#: The forwarder with no balancing work (``Lineup.floor``), run as a script by pacslb's interpreter.
FLOOR = Path(__file__).resolve().parent.parent / "floor.py"


@dataclass
class Context:
    procs: Processes
    ports: Ports
    workdir: Path
    cache: Path
    caps: Capabilities
    cores: int
    repeat: int
    quick: bool
    http_mode: str  # "auto", "tcp" or "http": pacslb's mode in the HTTP case
    profile_dir: Path | None = None  # where py-spy profiles go (--profile), or None

    def say(self, text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def duration(self, full: float, quick: float) -> float:
        return quick if self.quick else full


@dataclass
class Subject:
    key: str
    label: str
    kind: str  # "direct", "pacslb", "haproxy" or "floor"
    port: int = 0
    proc: Proc | None = None
    start: Callable[[Subject], None] | None = field(default=None, repr=False)


class Lineup:
    """The subjects of one case. pacslb's come in two sizes when the config has ``workers``: ``@1`` (one
    process, against HAProxy's ``nbthread 1``) and ``@def`` (the default, one per core, against HAProxy's
    default threads); without ``workers`` there is one pacslb process and both names point to it."""

    def __init__(self, ctx: Context, case: CaseResult, nodes: list[Node]) -> None:
        self.ctx = ctx
        self.case = case
        self.nodes = nodes
        self.subjects: list[Subject] = []
        self.aliases: dict[str, str] = {}

    def key(self, name: str) -> str:
        return self.aliases.get(name, name)

    def _add(self, subject: Subject) -> Subject:
        self.subjects.append(subject)
        self.case.subjects[subject.key] = subject.label
        return subject

    def direct(self, port: int, label: str = "direct (no balancer)") -> None:
        self._add(Subject("direct", label, "direct", port=port))

    def pacslb(
        self,
        variant: str,
        description: str,
        *,
        mode: str = "tcp",
        relay: str = "splice",
        persistence: dict[str, Any] | None = None,
        nodes: list[Node] | None = None,
        sizes: tuple[str, ...] = ("1", "def"),
        maxconn: int = peers.MAXCONN,
    ) -> None:
        """Adds ``pacslb-VARIANT@1`` and ``pacslb-VARIANT@def`` (or one subject both names point to)."""
        targets = nodes or self.nodes

        def starter(workers: int | None) -> Callable[[Subject], None]:
            def start(subject: Subject) -> None:
                subject.port = self.ctx.ports.take()
                config = peers.pacslb_config(
                    subject.port, targets, mode=mode, persistence=persistence, workers=workers, maxconn=maxconn
                )
                name = subject.key.replace("@", "-")
                subject.proc = peers.start_pacslb(
                    self.ctx.procs, name, config, subject.port, self.ctx.workdir, relay=relay
                )

            return start

        base = f"pacslb-{variant}"
        if not self.ctx.caps.workers:
            self._add(Subject(base, f"pacslb {description} (1 process)", "pacslb", start=starter(None)))
            self.aliases[f"{base}@1"] = self.aliases[f"{base}@def"] = base
            return
        if "1" in sizes:
            self._add(Subject(f"{base}@1", f"pacslb {description}, workers: 1", "pacslb", start=starter(1)))
        if "def" in sizes:
            label = f"pacslb {description}, default workers ({self.ctx.cores})"
            if self.ctx.cores == 1 and "1" in sizes:
                self.aliases[f"{base}@def"] = f"{base}@1"
            else:
                self._add(Subject(f"{base}@def", label, "pacslb", start=starter(None)))

    def haproxy(
        self,
        variant: str,
        description: str = "",
        *,
        mode: str = "tcp",
        splice: str | None = None,
        nodes: list[Node] | None = None,
        sizes: tuple[str, ...] = ("1", "def"),
        maxconn: int = peers.MAXCONN,
    ) -> None:
        """Adds ``VARIANT@1`` (nbthread 1) and ``VARIANT@def`` (HAProxy's default: a thread per core)."""
        targets = nodes or self.nodes

        def starter(nbthread: int | None) -> Callable[[Subject], None]:
            def start(subject: Subject) -> None:
                subject.port = self.ctx.ports.take()
                config = peers.haproxy_config(
                    subject.port, targets, nbthread=nbthread, mode=mode, splice=splice, maxconn=maxconn
                )
                name = subject.key.replace("@", "-")
                subject.proc = peers.start_haproxy(self.ctx.procs, name, config, subject.port, self.ctx.workdir)

            return start

        extra = f" {description}" if description else ""
        if "1" in sizes:
            self._add(Subject(f"{variant}@1", f"HAProxy{extra}, nbthread 1", "haproxy", start=starter(1)))
        if "def" in sizes:
            label = f"HAProxy{extra}, default threads ({self.ctx.cores})"
            self._add(Subject(f"{variant}@def", label, "haproxy", start=starter(None)))

    def floor(self, mode: str, description: str) -> None:
        """Adds ``floor``: bench/floor.py in ``mode`` (``http`` or ``tcp``), one process, with the interpreter
        and the uvloop and httptools pacslb runs with: what this stack costs with no balancing work."""

        def start(subject: Subject) -> None:
            subject.port = self.ctx.ports.take()
            nodes = ",".join(str(node.port) for node in self.nodes)
            argv = [peers.pacslb_python(), str(FLOOR), mode, str(subject.port), nodes]
            subject.proc = self.ctx.procs.start("floor", argv, env=peers.pacslb_env(), cwd=self.ctx.workdir)
            self.ctx.procs.wait_listening(subject.proc, subject.port)

        label = f"floor: {description}, no balancing work (bench/floor.py, 1 process)"
        self._add(Subject("floor", label, "floor", start=start))

    def start(self) -> None:
        """Start every balancer; one that fails is reported in the case's notes and left out."""
        for subject in list(self.subjects):
            if subject.start is None:
                continue
            try:
                subject.start(subject)
            except (BenchError, OSError) as exc:
                self.case.notes.append(f"{subject.label} could not be started: {exc}")
                self.subjects.remove(subject)
                del self.case.subjects[subject.key]


CPU_METRICS = [
    Metric("cpu_pct", "balancer CPU %", False, 0),
    Metric("user_pct", "of which user %", False, 0),
]


def measure_all(
    ctx: Context,
    case: CaseResult,
    subjects: list[Subject],
    measure: Callable[[Subject], dict[str, float]],
    *,
    describe: Callable[[dict[str, float]], str] = lambda values: str(values),
    cpu: bool = True,
    then: Callable[[Subject], dict[str, float]] | None = None,
) -> None:
    """``ctx.repeat`` rounds; in each, every subject once, in an order rotated by one per round.
    ``then``: a second measurement right after ``measure`` (its values join the round's; the CPU figures
    are those of ``measure`` alone).

    With ``cpu``, the CPU time the balancer (all its processes) used during each measurement is added to
    its values: ``cpu_pct`` (user + system, percent of one core over the measurement's wall time; above
    100 with several processes) and ``user_pct`` (the user-space part, where Python runs; the rest is the
    kernel moving bytes). With ``ctx.profile_dir``, each running pacslb subject is first measured once more
    under py-spy, untimed (its figure is dropped: sampling costs CPU), and a summary of where its time went
    is added to the notes.
    """
    if cpu and not any(m.key == "cpu_pct" for m in case.metrics):
        case.metrics = case.metrics + CPU_METRICS
    started = time.monotonic()
    if ctx.profile_dir is not None:
        for subject in subjects:
            if subject.kind != "pacslb" or subject.proc is None:
                continue
            spy = profiling.start(ctx, case.key, subject)
            try:
                measure(subject)
            except (BenchError, OSError, ValueError) as exc:
                ctx.say(f"[{case.key}] profiled run of {subject.label} failed: {exc}")
            finally:
                note = profiling.finish(ctx, spy)
            if note:
                case.notes.append(f"py-spy, {subject.label}: {note}")
                ctx.say(f"[{case.key}] py-spy, {subject.label}: {note}")
    for rep in range(ctx.repeat):
        shift = rep % max(1, len(subjects))
        for subject in subjects[shift:] + subjects[:shift]:
            before = tree_cpu_seconds(subject.proc.pid) if cpu and subject.proc is not None else None
            wall = time.monotonic()
            try:
                values = measure(subject)
                if before is not None and subject.proc is not None:
                    user, system = tree_cpu_seconds(subject.proc.pid)
                    wall = time.monotonic() - wall
                    values["cpu_pct"] = 100 * (user - before[0] + system - before[1]) / wall
                    values["user_pct"] = 100 * (user - before[0]) / wall
                if then is not None:
                    values |= then(subject)
            except (BenchError, OSError, ValueError) as exc:
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                case.notes.append(f"{subject.label}, round {rep + 1}: failed: {first_line}")
                ctx.say(f"[{case.key}] round {rep + 1}/{ctx.repeat} {subject.label}: FAILED {exc}")
                continue
            case.add_run(subject.key, values)
            text = describe(values)
            if "cpu_pct" in values:
                text += f"; balancer CPU {values['cpu_pct']:.0f}% ({values['user_pct']:.0f}% user)"
            ctx.say(f"[{case.key}] round {rep + 1}/{ctx.repeat} {subject.label}: {text}")
    case.seconds += time.monotonic() - started


#: Beyond a run's own duration, how long the load generator may take to start, finish and report.
LOADGEN_SLACK = 30.0


def run_loadgen(mode: str, ports: list[int], seconds: float, extra: list[str]) -> dict[str, Any]:
    """One run of the bench's load generator (``python -m bench.loadgen``): its JSON report.

    Raises:
        BenchError: it failed, or did not finish in time.
    """
    argv = [peers.python(), "-m", "bench.loadgen", mode, "--duration", f"{seconds:g}", *extra]
    for port in ports:
        argv += ["--port", str(port)]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + LOADGEN_SLACK,
            cwd=peers.ROOT,
            env=os.environ | peers.helper_env(),
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"the load generator did not finish within {seconds + LOADGEN_SLACK:.0f}s") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchError(f"the load generator failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    return report
