"""Case (b), DICOM C-STORE of a CT study (420 instances, 220 MB): MB/s and instances/s per subject.

Owns: the storescu -> storescp line-up (direct; pacslb ``mode: tcp`` and ``mode: dicom``; HAProxy in tcp
mode), timing one storescu run per measurement (the whole study over one association, as a modality sends
it), and one untimed verification pass per subject in which storescp stores to a tmpfs folder and every
instance is compared with the manifest (all arrived, once, pixel data identical). Timed runs use
``storescp --ignore`` (received in full, not written), so the disk is not measured.

dcmtk as packaged here does not set TCP_NODELAY unless the environment says so: without it each
C-STORE-RSP waits on a delayed ACK (about 45 ms per instance: 20 s for this study). The bench sets
``TCP_NODELAY=1`` for storescu and storescp, so the network path, not Nagle's algorithm, is measured.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import dicomdata, peers
from bench.cases.common import Context, Lineup, Subject, measure_all
from bench.peers import Node
from bench.procs import BenchError
from bench.report import CaseResult, Comparison, Metric, Target

KEY = "dicom"
#: storescu must finish the study within this (it takes a few seconds; a stall means something is wrong).
STORE_TIMEOUT = 180.0
DCMTK_ENV = {"TCP_NODELAY": "1"}
#: Where verification runs store the study: a tmpfs when there is one, so the disk is not in the way.
SHM = Path("/dev/shm")


def storescu(port: int, folder: Path, options: tuple[str, ...] = ()) -> float:
    """Send every file of ``folder`` in one association (``options``: more storescu options, e.g. TLS); the
    wall time in seconds."""
    argv = [peers.STORESCU, *options, "-aet", "BENCH", "-aec", "STORESCP", "+sd", "+r", "127.0.0.1", str(port)]
    argv.append(str(folder))
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=STORE_TIMEOUT, env=os.environ | DCMTK_ENV)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"storescu did not finish within {STORE_TIMEOUT:.0f}s") from exc
    elapsed = time.monotonic() - started
    if done.returncode != 0 or "E:" in done.stderr:
        raise BenchError(f"storescu failed ({done.returncode}): {(done.stderr or done.stdout).strip()[:300]}")
    return elapsed


def run(ctx: Context) -> CaseResult:
    ctx.say("[dicom] preparing the study (generated once into bench/.cache)")
    study = dicomdata.ensure_study(ctx.cache)
    megabytes = study.file_bytes / 1e6
    case = CaseResult(
        KEY,
        f"(b) DICOM C-STORE: storescu -> storescp, one association, {study.instances} CT instances, {megabytes:.0f} MB",
        [Metric("mbps", "MB/s"), Metric("ips", "instances/s"), Metric("seconds", "s", False, 2)],
    )
    port = ctx.ports.take()
    lineup = Lineup(ctx, case, [Node("scp", port)])
    lineup.direct(port)
    lineup.pacslb("tcp", "mode: tcp", mode="tcp")
    lineup.pacslb("dicom", "mode: dicom", mode="dicom")
    lineup.haproxy("haproxy", "mode tcp")
    lineup.start()

    verify_root = Path(tempfile.mkdtemp(prefix="pacslb-bench-", dir=SHM if SHM.is_dir() else None))
    try:
        for subject in lineup.subjects:
            out = verify_root / subject.key.replace("@", "-")
            out.mkdir()
            scp = peers.start_storescp(ctx.procs, f"storescp-verify-{out.name}", port, out, env=DCMTK_ENV)
            try:
                storescu(subject.port, study.folder)
            except BenchError as exc:
                case.notes.append(f"verification through {subject.label}: storescu failed: {exc}")
                continue
            finally:
                ctx.procs.stop(scp)
            ok, text = dicomdata.verify(study, out)
            line = f"verification through {subject.label}: {'intact' if ok else 'NOT INTACT'}: {text}"
            case.notes.append(line)
            ctx.say(f"[dicom] {line}")
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(verify_root, ignore_errors=True)

    scp = peers.start_storescp(ctx.procs, "storescp", port, None, env=DCMTK_ENV)

    def measure(subject: Subject) -> dict[str, float]:
        if not scp.alive():
            raise BenchError("storescp is no longer running")
        seconds = storescu(subject.port, study.folder)
        return {"mbps": megabytes / seconds, "ips": study.instances / seconds, "seconds": seconds}

    measure_all(ctx, case, lineup.subjects, measure, describe=lambda v: f"{v['mbps']:.0f} MB/s, {v['seconds']:.2f} s")
    ctx.procs.stop(scp)
    k = lineup.key
    case.comparisons = [
        Comparison("pacslb tcp, workers 1 / HAProxy nbthread 1", "mbps", k("pacslb-tcp@1"), "haproxy@1"),
        Comparison(
            "pacslb tcp / HAProxy, both default", "mbps", k("pacslb-tcp@def"), "haproxy@def", Target(">=", 1.0), "#6"
        ),
        Comparison(
            "pacslb dicom / HAProxy, both default",
            "mbps",
            k("pacslb-dicom@def"),
            "haproxy@def",
            Target(">=", 1.0),
            "#6",
        ),
        Comparison(
            "pacslb dicom / pacslb tcp (default workers)",
            "mbps",
            k("pacslb-dicom@def"),
            k("pacslb-tcp@def"),
            Target(">=", 0.95),
            "#4",
        ),
        Comparison("pacslb tcp / direct", "mbps", k("pacslb-tcp@def"), "direct"),
    ]
    case.notes.append(
        "storescp's maximum PDU is 131072 bytes (-pdu), so storescu sends 128 KiB PDUs; timed runs use --ignore."
    )
    return case
