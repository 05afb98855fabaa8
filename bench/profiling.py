"""``--profile``: where a pacslb process spends its time during a measurement, sampled with py-spy.

Owns: attaching ``py-spy record`` (non-blocking, all of pacslb's processes) to a running pacslb, stopping it
by PID with SIGINT so it writes its samples, and turning the collapsed stacks into a one-line summary
(the functions with the most samples of their own, and the share of samples whose innermost Python frame
is pacslb's code, the system calls it makes included; uvloop's C code shows as ``Runner.run``). The
raw stacks stay in the profile folder for a closer look (e.g. with a flame graph tool). py-spy is not a
dependency of pacslb: ``pip install py-spy`` where profiles are wanted. It must not measure figures.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.procs import Proc

if TYPE_CHECKING:
    from bench.cases.common import Context, Subject

#: Samples per second: enough for a few-second run, light on a 2-core machine.
RATE = 250
#: How long py-spy may take to write its output after SIGINT.
WRITE_TIMEOUT = 30.0
TOP = 6


@dataclass
class Spy:
    proc: Proc
    output: Path


def start(ctx: Context, case: str, subject: Subject) -> Spy | None:
    exe = shutil.which("py-spy")
    if exe is None or ctx.profile_dir is None or subject.proc is None:
        return None
    ctx.profile_dir.mkdir(parents=True, exist_ok=True)
    output = ctx.profile_dir / f"{case}-{subject.key.replace('@', '-')}.txt"
    argv = [exe, "record", "--pid", str(subject.proc.pid), "--subprocesses", "--nonblocking"]
    argv += ["--rate", str(RATE), "--format", "raw", "--output", str(output)]
    return Spy(ctx.procs.start(f"py-spy-{case}-{subject.key.replace('@', '-')}", argv), output)


def _function(frame: str) -> str:
    """``name (path/to/file.py:123)`` -> ``name (file.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({Path(path).name})" if path else name


def summarize(output: Path) -> str:
    own: collections.Counter[str] = collections.Counter()
    in_pacslb = total = 0
    for line in output.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[_function(frames[-1])] += n
        if "pacslb/" in frames[-1]:
            in_pacslb += n
    if not total:
        return "no samples"
    top = ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in own.most_common(TOP))
    return (
        f"{total} samples; own time: {top}; innermost frame in pacslb {100 * in_pacslb / total:.0f}% "
        f"(raw stacks: {output.name})"
    )


def finish(ctx: Context, spy: Spy | None) -> str:
    if spy is None:
        return "py-spy not found (pip install py-spy)" if shutil.which("py-spy") is None else ""
    if spy.proc.alive():
        spy.proc.popen.send_signal(signal.SIGINT)
        try:
            spy.proc.popen.wait(timeout=WRITE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    ctx.procs.stop(spy.proc)
    if not spy.output.exists():
        return f"py-spy wrote nothing:\n{spy.proc.tail(3)}"
    return summarize(spy.output)
