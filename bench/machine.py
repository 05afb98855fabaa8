"""What machine and which versions a benchmark ran on, recorded with its figures.

Owns: cores, CPU model, memory, kernel, load average, file descriptor limits, and the versions of Python,
uvloop, pydicom, pynetdicom, pacslb, HAProxy, iperf3, wrk, nginx and dcmtk (asked of the binaries the bench
runs, by absolute path). It must not start anything that keeps running.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import subprocess
from pathlib import Path

from bench import peers
from bench.procs import file_max


def _first_line(argv: list[str], *, stderr: bool = False) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stderr if stderr else done.stdout) or done.stdout or done.stderr
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "?"


def _package(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _pacslb_version() -> str:
    """The version of the pacslb the bench runs, whether its per-request path is compiled, and where it is."""
    try:
        return peers.pacslb_version()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"not runnable ({exc})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "?"


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "?"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe(caps: peers.Capabilities) -> dict[str, str]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    dcmtk = _first_line([peers.STORESCU, "--version"]).strip("$ ").replace("dcmtk: ", "")
    return {
        "cores": f"{usable_cores()} ({_cpu_model()})",
        "memory": _memory(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "uvloop": _package("uvloop"),
        "pydicom / pynetdicom": f"{_package('pydicom')} / {_package('pynetdicom')}",
        "pacslb": f"{_pacslb_version()} (workers key: {'yes' if caps.workers else 'no'}, "
        f"mode http: {'yes' if caps.http_mode else 'no'})",
        "haproxy": _first_line([peers.HAPROXY, "-v"]).split(" - ")[0],
        "iperf3": _first_line([peers.IPERF3, "--version"]),
        "wrk": _first_line([peers.WRK, "--version"]),
        "nginx": _first_line([peers.NGINX, "-v"], stderr=True),
        "dcmtk": dcmtk,
        "RLIMIT_NOFILE (soft / hard), fs.file-max": f"{soft:,} / {hard:,}, {file_max():,}",
    }
