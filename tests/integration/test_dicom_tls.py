"""DICOM over TLS in mode dicom (``dicom.tls`` on the listener, ``dicom.node_tls`` toward the nodes).

Real peers on both sides: dcmtk's tools with ``+tls`` and pynetdicom with ``tls_args`` as modalities,
Orthanc as a plain node and, with ``DicomTlsEnabled``, as a TLS node that requires the balancer's client
certificate. Certificates come from a throwaway CA made with openssl (pki.py), with a CRL.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import peers
import pytest
from peers import OrthancCluster, OrthancNode, PacslbProcess, Study, ToolResult
from pki import Issued, TestCA

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def certs(ca: TestCA) -> dict[str, Issued]:
    """pacslb's server and client certificates, two modalities', one to be revoked, and a node's."""
    return {name: ca.issue(name) for name in ("pacslb.test", "ct01.radiology.test", "mr01.radiology.test",
                                                "old.radiology.test", "pacs-node.test")}  # fmt: skip


@pytest.fixture(scope="module")
def plain_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancNode]:
    cluster = OrthancCluster(tmp_path_factory.mktemp("orthanc"))
    try:
        yield cluster.start(1)[0]
    finally:
        cluster.discard()


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, ca: TestCA, certs: dict[str, Issued]) -> Iterator[OrthancNode]:
    """An Orthanc node that speaks only DICOM TLS and requires a client certificate from the test CA."""
    cluster = OrthancCluster(tmp_path_factory.mktemp("orthanc-tls"))
    node_cert = certs["pacs-node.test"]
    cluster.nodes.append(
        OrthancNode(
            "tlspacs",
            peers.free_port(),
            peers.free_port(),
            cluster.root / "tlspacs",
            cluster.worklists,
            extra={
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(node_cert.certificate),
                "DicomTlsPrivateKey": str(node_cert.key),
                "DicomTlsTrustedCertificates": str(ca.certificate),
                "DicomTlsRemoteCertificateRequired": True,
            },
        )
    )
    cluster.worklists.mkdir(parents=True, exist_ok=True)
    try:
        cluster.nodes[0].start()
        yield cluster.nodes[0]
    finally:
        cluster.discard()


def listener_tls(certs: dict[str, Issued], **extra: Any) -> dict[str, Any]:
    server = certs["pacslb.test"]
    return {"certificate": str(server.certificate), "key": str(server.key), **extra}


def node_tls(ca: TestCA, certs: dict[str, Issued]) -> dict[str, Any]:
    client = certs["pacslb.test"]
    return {"ca": str(ca.certificate), "certificate": str(client.certificate), "key": str(client.key)}


def start(
    pacslb: PacslbFactory, node: OrthancNode, dicom: dict[str, Any], **kwargs: Any
) -> tuple[PacslbProcess, int, int]:
    """pacslb with one dicom service in front of ``node``: the process, the service's port, the admin port."""
    port, admin = peers.free_port(), peers.free_port()
    spec = peers.dicom_service(port, {node.name: node.address}, dicom=dicom, **kwargs)
    return pacslb(peers.config_text({"dicom": spec}, admin={"listen": f"127.0.0.1:{admin}"})), port, admin


def tls_tool(tool: str, port: int, ca: TestCA, cert: Issued | None, *files: str, calling: str) -> ToolResult:
    """A dcmtk tool over TLS (its default profile: BCP 195 non-downgrading), with ``cert`` as its own."""
    own = ("+tls", str(cert.key), str(cert.certificate)) if cert is not None else ("+tla",)
    scan = ("+sd", "+r") if files else ()
    return peers.dcmtk(
        tool, "-v", *own, "+cf", str(ca.certificate), "-aet", calling, "-aec", "ANY-SCP", *scan,
        "127.0.0.1", str(port), *files, timeout=60.0,
    )  # fmt: skip


def test_dcmtk_stores_a_study_over_tls_with_a_client_certificate_and_it_lands_whole(
    pacslb: PacslbFactory, plain_node: OrthancNode, ca: TestCA, certs: dict[str, Issued], study: Study
) -> None:
    tls = listener_tls(certs, client_certificate="required", ca=str(ca.certificate), crl=str(ca.crl))
    lb, port, _admin = start(pacslb, plain_node, {"tls": tls})
    check = peers.run_pacslb_cli("check", str(lb.config_path))
    assert check.ok and "dicom 127.0.0.1:" in check.output, check
    assert "TLS (client certificate required), 1 servers" in check.output, check

    echo = tls_tool("echoscu", port, ca, certs["ct01.radiology.test"], calling="CT01")
    assert echo.ok and "Received Echo Response (Success)" in echo.output, echo
    store = tls_tool("storescu", port, ca, certs["ct01.radiology.test"], str(study.directory),
                     calling="CT01")  # fmt: skip
    assert store.ok, store
    assert set(study.sop_uids) <= plain_node.sop_instance_uids(), "every instance sent over TLS is stored"

    first, second = lb.wait_events("assoc", 2, timeout=5.0)
    for line in (first, second):
        assert (line.get("outcome"), line.get("server"), line.get("calling")) == ("accepted", "pacs1", "CT01")
        assert line.get("tls").startswith("TLSv1."), line.line
        assert line.get("identity") == "ct01.radiology.test", line.line
    assert int(second.get("bytes_up")) > sum(f.stat().st_size for f in study.files) // 2, second.line


def test_a_certificate_not_bound_to_the_calling_ae_title_is_rejected_1_1_3(
    pacslb: PacslbFactory, plain_node: OrthancNode, ca: TestCA, certs: dict[str, Issued]
) -> None:
    bound = {"CT01": ["ct01.radiology.test"], "MR*": ["mr*.radiology.test"]}
    tls = listener_tls(certs, client_certificate="required", ca=str(ca.certificate), ae_identities=bound)
    lb, port, _admin = start(pacslb, plain_node, {"tls": tls})

    assert tls_tool("echoscu", port, ca, certs["mr01.radiology.test"], calling="MR01").ok
    impostor = tls_tool("echoscu", port, ca, certs["mr01.radiology.test"], calling="CT01")
    unlisted = tls_tool("echoscu", port, ca, certs["ct01.radiology.test"], calling="US01")

    for refused in (impostor, unlisted):
        assert not refused.ok, refused
        assert "Rejected Permanent" in refused.output and "Calling AE Title Not Recognized" in refused.output
    ok, bad, other = lb.wait_events("assoc", 3, timeout=5.0)
    assert ok.get("outcome") == "accepted", ok.line
    assert (bad.get("outcome"), bad.get("by"), bad.get("identity")) == ("rejected", "balancer", "mr01.radiology.test")
    assert bad.get("detail").startswith("1-1-3") and "not bound to CT01" in bad.get("detail"), bad.line
    assert other.get("detail").startswith("1-1-3"), other.line


def test_a_plain_client_a_client_without_a_certificate_and_a_revoked_one_are_refused_and_logged(
    pacslb: PacslbFactory, plain_node: OrthancNode, ca: TestCA, certs: dict[str, Issued]
) -> None:
    tls = listener_tls(certs, client_certificate="required", ca=str(ca.certificate), crl=str(ca.crl))
    old = certs["old.radiology.test"]
    ca.revoke(old)
    lb, port, _admin = start(pacslb, plain_node, {"tls": tls})

    plain = peers.echoscu(port, calling="PLAIN")
    anonymous = tls_tool("echoscu", port, ca, None, calling="ANON")
    revoked = tls_tool("echoscu", port, ca, old, calling="OLD")

    for refused in (plain, anonymous, revoked):
        assert not refused.ok and "Association Accepted" not in refused.output, refused
    lines = lb.wait_events("assoc", 3, timeout=10.0)
    for line in lines:
        assert (line.get("outcome"), line.get("by"), line.get("server")) == ("aborted", "balancer", "-"), line.line
        assert line.get("detail").startswith("TLS handshake failed"), line.line
    reasons = " / ".join(line.get("detail") for line in lines)
    assert "wrong version number" in reasons or "http request" in reasons, reasons  # the plain client's RQ
    assert "certificate verify failed: certificate revoked" in reasons, reasons
    assert "peer did not return a certificate" in reasons, reasons
    assert not lb.events("assoc_retry") and not lb.events("connect_failed"), "no node was offered anything"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_the_bcp195_profile_takes_clients_without_certificates_and_refuses_tls_1_1_and_weak_suites(
    pacslb: PacslbFactory, plain_node: OrthancNode, ca: TestCA, certs: dict[str, Issued]
) -> None:
    lb, port, _ = start(pacslb, plain_node, {"tls": listener_tls(certs)})

    # No client certificate asked for: dcmtk without one of its own (+tla) is served, over TLS 1.3.
    anonymous = tls_tool("echoscu", port, ca, None, calling="ANON")
    assert anonymous.ok and "Received Echo Response (Success)" in anonymous.output, anonymous
    line = lb.wait_event("assoc", 5.0, calling="ANON")
    assert (line.get("outcome"), line.get("identity")) == ("accepted", "-") and line.get("tls").startswith("TLSv1.3")

    def handshake(configure: Callable[[ssl.SSLContext], None]) -> str:
        context = ssl.create_default_context(cafile=str(ca.certificate))
        context.check_hostname = False
        configure(context)
        with socket.create_connection(("127.0.0.1", port), timeout=10.0) as raw:
            try:
                with context.wrap_socket(raw) as tls:
                    return str(tls.version())
            except ssl.SSLError as exc:
                return f"refused: {exc.reason}"

    def tls12(suite: str) -> Callable[[ssl.SSLContext], None]:
        def configure(context: ssl.SSLContext) -> None:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(suite)

        return configure

    def old(context: ssl.SSLContext) -> None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("ALL:@SECLEVEL=0")

    assert handshake(lambda context: None) == "TLSv1.3"
    assert handshake(tls12("ECDHE-ECDSA-AES128-GCM-SHA256")) == "TLSv1.2"
    assert handshake(tls12("ECDHE-ECDSA-CHACHA20-POLY1305")) == "TLSv1.2"
    assert handshake(tls12("ECDHE-ECDSA-AES128-SHA")).startswith("refused"), "CBC without AEAD"
    assert handshake(old).startswith("refused"), "TLS 1.1"


def test_pynetdicom_over_tls_to_a_tls_node_that_requires_the_balancers_certificate(
    pacslb: PacslbFactory, tls_node: OrthancNode, ca: TestCA, certs: dict[str, Issued], study: Study
) -> None:
    """Both sides TLS, with pynetdicom's tls_args as the modality; the node's C-ECHO check speaks TLS too
    (a node requiring a client certificate would refuse it otherwise)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    tls = listener_tls(certs, client_certificate="optional", ca=str(ca.certificate))
    check = {"type": "dicom_echo", "interval": "2s", "timeout": "2s"}
    lb, port, admin = start(pacslb, tls_node, {"tls": tls, "node_tls": node_tls(ca, certs)}, check=check)

    context = ssl.create_default_context(cafile=str(ca.certificate))
    context.check_hostname = False
    modality = certs["ct01.radiology.test"]
    context.load_cert_chain(str(modality.certificate), str(modality.key))
    ae = AE(ae_title="CT01")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="TLSPACS", tls_args=(context, None))
    try:
        assert assoc.is_established, "the association through both TLS hops"
        assert assoc.send_c_echo().Status == 0
        for dataset in study.datasets()[:5]:
            assert assoc.send_c_store(dataset).Status == 0
        assoc.release()
    finally:
        ae.shutdown()
    assert set(list(study.sop_uids)) & tls_node.sop_instance_uids(), "the instances reached the TLS node"
    line = lb.wait_event("assoc", 5.0, calling="CT01")
    assert (line.get("outcome"), line.get("server"), line.get("identity")) == (
        "accepted",
        "tlspacs",
        "ct01.radiology.test",
    )
    peers.wait_for(
        lambda: peers.admin_server(admin, "dicom", "tlspacs")["check"]["reason"] == "C-ECHO success",
        15.0,
        "a C-ECHO check over TLS",
    )
    assert not lb.events("health"), "the TLS node stayed up"


def test_a_plain_modality_reaches_a_tls_node_through_the_balancer_and_a_tcp_check_completes_the_handshake(
    pacslb: PacslbFactory, tls_node: OrthancNode, ca: TestCA, certs: dict[str, Issued]
) -> None:
    check = {"type": "tcp", "interval": "2s", "timeout": "2s"}
    lb, port, admin = start(pacslb, tls_node, {"node_tls": node_tls(ca, certs)}, check=check)
    echo = peers.echoscu(port, calling="PLAINCT")
    assert echo.ok and "Received Echo Response (Success)" in echo.output, echo
    line = lb.wait_event("assoc", 5.0, calling="PLAINCT")
    assert (line.get("outcome"), line.get("server"), line.get("tls")) == ("accepted", "tlspacs", ""), line.line
    peers.wait_for(
        lambda: peers.admin_server(admin, "dicom", "tlspacs")["check"]["reason"] == "TLS handshake done",
        15.0,
        "a tcp check with a TLS handshake",
    )

    # A node whose certificate does not chain to node_tls.ca is not spoken to: its handshake fails as a
    # connect would, and the modality hears temporary congestion, not a broken association.
    other = TestCA(ca.folder.parent / "other-ca")
    wrong = {"ca": str(other.certificate), "certificate": str(certs["pacslb.test"].certificate),
             "key": str(certs["pacslb.test"].key)}  # fmt: skip
    lb2, port2, _ = start(pacslb, tls_node, {"node_tls": wrong})
    refused = peers.echoscu(port2, calling="PLAINCT")
    assert not refused.ok and "Rejected Transient" in refused.output, refused
    failed = lb2.wait_event("connect_failed", 5.0, server="tlspacs")
    assert "TLS handshake failed: certificate verify failed" in failed.get("reason"), failed.line
