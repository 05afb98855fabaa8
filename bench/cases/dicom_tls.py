"""Case (b, TLS), DICOM C-STORE over TLS: what terminating DICOM TLS costs, against HAProxy doing the same.

Owns: the storescu-over-TLS -> plain storescp line-up (storescu ``+tls`` with a client certificate, dcmtk's
default BCP 195 profile): pacslb ``mode: dicom`` with ``dicom.tls`` (it reads the A-ASSOCIATE-RQ, then
relays the decrypted association in its main process: TLS cannot be spliced), HAProxy in tcp mode with an
``ssl`` bind (TLS terminated, bytes relayed), and the same storescu against storescp terminating TLS itself
(``direct``: the cost of TLS with no balancer). The study and the timing are case (b)'s; the certificates
(a throwaway CA, a server and a client certificate, EC P-256) are made once into bench/.cache.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench import dicomdata, peers
from bench.cases.common import Context, Subject, measure_all
from bench.cases.dicom_store import DCMTK_ENV, storescu
from bench.procs import BenchError
from bench.report import CaseResult, Comparison, Metric

KEY = "dicom_tls"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def certificates(cache: Path) -> dict[str, Path]:
    """ca.pem, server.pem/.key (127.0.0.1), client.pem/.key, and server.combined.pem for HAProxy."""
    folder = cache / "tls"
    paths = {n: folder / n for n in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")}
    paths["combined"] = folder / "server.combined.pem"
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", str(paths["ca.key"]), "-out", str(paths["ca.pem"]), "-days", "365",
             "-subj", "/CN=pacslb bench CA")  # fmt: skip
    for name in ("server", "client"):
        csr, ext = folder / f"{name}.csr", folder / f"{name}.ext"
        ext.write_text("subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth,clientAuth\n")
        _openssl("req", *ec, "-keyout", str(paths[f"{name}.key"]), "-out", str(csr), "-subj", f"/CN=bench-{name}")
        ca = ("-CA", str(paths["ca.pem"]), "-CAkey", str(paths["ca.key"]), "-CAcreateserial")
        _openssl("x509", "-req", "-in", str(csr), *ca, "-out", str(paths[f"{name}.pem"]), "-days", "365",
                 "-extfile", str(ext))  # fmt: skip
    paths["combined"].write_text(paths["server.pem"].read_text() + paths["server.key"].read_text())
    return paths


def storescu_tls(port: int, folder: Path, certs: dict[str, Path]) -> float:
    """Case (b)'s storescu run over TLS, with the client certificate; the wall time in seconds."""
    tls = ("+tls", str(certs["client.key"]), str(certs["client.pem"]), "+cf", str(certs["ca.pem"]))
    return storescu(port, folder, tls)


def run(ctx: Context) -> CaseResult:
    study = dicomdata.ensure_study(ctx.cache)
    certs = certificates(ctx.cache)
    megabytes = study.file_bytes / 1e6
    case = CaseResult(
        KEY,
        f"(b, TLS) DICOM C-STORE over TLS: storescu +tls -> storescp, one association, {study.instances} CT "
        f"instances, {megabytes:.0f} MB",
        [Metric("mbps", "MB/s"), Metric("seconds", "s", False, 2)],
    )
    plain_port, tls_port = ctx.ports.take(), ctx.ports.take()
    node = peers.Node("scp", plain_port)
    scp = peers.start_storescp(ctx.procs, "storescp", plain_port, None, env=DCMTK_ENV)
    direct = ctx.procs.start(
        "storescp-tls",
        [peers.STORESCP, "+tls", str(certs["server.key"]), str(certs["server.pem"]), "+cf", str(certs["ca.pem"]),
         "-aet", "STORESCP", "-pdu", "131072", "--ignore", str(tls_port)],
        env=DCMTK_ENV,
    )  # fmt: skip
    ctx.procs.wait_listening(direct, tls_port)
    subjects = [Subject("direct", "direct: storescp terminates TLS itself", "direct", port=tls_port)]

    port = ctx.ports.take()
    config = peers.pacslb_config(port, [node], mode="dicom")
    config["services"]["bench"]["dicom"] = {
        "tls": {"certificate": str(certs["server.pem"]), "key": str(certs["server.key"]),
                "client_certificate": "required", "ca": str(certs["ca.pem"])},
    }  # fmt: skip
    proc = peers.start_pacslb(ctx.procs, "pacslb-dicom-tls", config, port, ctx.workdir)
    subjects.append(Subject("pacslb-dicom-tls", "pacslb mode dicom, dicom.tls (default workers)", "pacslb", port, proc))

    port = ctx.ports.take()
    haproxy = peers.haproxy_config(port, [node]).replace(
        f"bind 127.0.0.1:{port}",
        f"bind 127.0.0.1:{port} ssl crt {certs['combined']} ca-file {certs['ca.pem']} verify required",
    )
    proc = peers.start_haproxy(ctx.procs, "haproxy-tls", haproxy, port, ctx.workdir)
    subjects.append(Subject("haproxy-tls", "HAProxy mode tcp, ssl bind (default threads)", "haproxy", port, proc))
    for subject in subjects:
        case.subjects[subject.key] = subject.label

    def measure(subject: Subject) -> dict[str, float]:
        if not scp.alive() or not direct.alive():
            raise BenchError("storescp is no longer running")
        seconds = storescu_tls(subject.port, study.folder, certs)
        return {"mbps": megabytes / seconds, "seconds": seconds}

    measure_all(ctx, case, subjects, measure, describe=lambda v: f"{v['mbps']:.0f} MB/s, {v['seconds']:.2f} s")
    case.comparisons = [
        Comparison("pacslb dicom TLS / HAProxy tcp TLS", "mbps", "pacslb-dicom-tls", "haproxy-tls"),
        Comparison("pacslb dicom TLS / direct TLS", "mbps", "pacslb-dicom-tls", "direct"),
        Comparison("HAProxy tcp TLS / direct TLS", "mbps", "haproxy-tls", "direct"),
    ]
    case.notes.append(
        "storescu +tls with a client certificate, dcmtk's default profile (BCP 195 non-downgrading: TLS 1.2+); "
        "pacslb and HAProxy both require and check the client certificate; timed runs use storescp --ignore."
    )
    return case
