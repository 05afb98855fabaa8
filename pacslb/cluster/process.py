"""How keepalived finds this balancer's process and runs its commands.

What this module owns: naming the process of ``pacslb run`` (its ``comm``, the name ``ps`` and
``/proc/PID/stat`` show) :data:`PROCESS_NAME`, so that keepalived can watch it through the kernel's process
events and move the virtual IP the moment it exits, a ``kill -9`` included, without waiting for a
health check to fail; and the absolute command line that runs pacslb from keepalived's scripts
(:func:`command_line`). It must not do anything else to the process.

Why a name of its own: the command line of ``pacslb run`` depends on how it was started (``/usr/bin/python3
/usr/local/bin/pacslb run ...``, ``python -m pacslb run ...``), so keepalived could only match it with a
pattern written for one installation. The commands keepalived itself runs every second (``pacslb health``)
are called ``pacslb`` or ``python3``, never :data:`PROCESS_NAME`, so they cannot stand in for a dead
balancer. Relay and web workers are started with ``exec`` and keep the interpreter's name: only the main
process, which decides every connection, counts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

#: ``comm`` of the main process of ``pacslb run`` (at most 15 bytes: the kernel's limit).
PROCESS_NAME = "pacslb-run"


def name_process(name: str = PROCESS_NAME) -> bool:
    """Give this process (its main thread) the name ``name``, through ``/proc/self/comm``.

    Returns:
        Whether the kernel took it (False without /proc, e.g. not Linux; nothing else changes).
    """
    try:
        with open("/proc/self/comm", "w", encoding="ascii") as comm:
            comm.write(name[:15])
    except OSError:
        return False
    return True


#: Starting the interpreter once to see whether it finds pacslb by itself takes well under a second.
PROBE_TIMEOUT = 30.0


def command_line() -> list[str]:
    """The absolute command that runs this pacslb from a keepalived script: this interpreter with ``-m
    pacslb``. keepalived runs scripts with an almost empty environment from ``/``: when this interpreter
    finds pacslb only through ``PYTHONPATH`` or the current folder (a source checkout that was not
    installed), the command sets ``PYTHONPATH`` itself, through ``env``.
    """
    python = os.path.abspath(sys.executable)  # not resolved: a virtual environment's python is a symlink
    try:
        probe = subprocess.run(
            [python, "-I", "-c", "import pacslb"], cwd="/", env={}, capture_output=True, timeout=PROBE_TIMEOUT,
            check=False,
        )  # fmt: skip
        found = probe.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        found = False
    env = shutil.which("env") or "/usr/bin/env"
    if not found:
        root = Path(__file__).resolve().parents[2]
        return [env, f"PYTHONPATH={root}", python, "-m", "pacslb"]
    if os.path.realpath(python) != python:
        # keepalived (enable_script_security) runs a script by the resolved path of its first word: the
        # interpreter behind a virtual environment's symlink, outside the environment, without pacslb.
        # Through env, the interpreter is run by the path given here.
        return [env, python, "-m", "pacslb"]
    return [python, "-m", "pacslb"]
