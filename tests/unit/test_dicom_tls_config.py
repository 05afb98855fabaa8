"""mode dicom's TLS settings: the config's checks (``dicom.tls``, ``dicom.node_tls``), the contexts made from
them (the bcp195 profile), and the certificate identity bound to calling AE titles (pure functions)."""

from __future__ import annotations

import ssl
import subprocess
import textwrap
from pathlib import Path

import pytest

from pacslb.balance.dicom_policy import identity_allows
from pacslb.config import load_config_text
from pacslb.config.model import DicomTlsSpec
from pacslb.errors import ConfigError
from pacslb.proxy.dicomtls import identities, listener_context

FILE = "pacslb.yaml"


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pem")
    cert, key = _self_signed(folder, "pacslb.test")
    other_cert, other_key = _self_signed(folder, "other.test")
    return {"cert": cert, "key": key, "other_key": other_key, "other_cert": other_cert}


def config(tls: str) -> str:
    return textwrap.dedent("""\
        services:
          a:
            listen: 127.0.0.1:104
            mode: dicom
            servers: {p1: 10.0.0.11:104}
            dicom:
        """) + textwrap.indent(textwrap.dedent(tls), " " * 6)


def test_a_listener_with_defaults_takes_the_bcp195_profile(pem: dict[str, Path]) -> None:
    loaded = load_config_text(config(f"tls: {{certificate: {pem['cert']}, key: {pem['key']}}}"), FILE)
    dicom = loaded.services["a"].dicom
    assert dicom is not None and dicom.tls is not None and dicom.node_tls is None
    tls = dicom.tls
    assert (tls.profile, tls.min_version, tls.client_certificate, tls.ae_identities) == ("bcp195", "1.2", "none", None)
    context = listener_context(tls)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2 and context.verify_mode == ssl.CERT_NONE
    tls12 = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(("GCM" in n or "CHACHA20" in n) and ("ECDHE" in n or "DHE" in n) for n in tls12), tls12


@pytest.mark.parametrize(
    ("tls", "field", "reason"),
    [
        ("tls: {certificate: CERT, key: KEY, client_certificate: required}", "services.a.dicom.tls", "needs ca"),
        ("tls: {certificate: CERT, key: KEY, ae_identities: {CT01: [ct01]}}", "services.a.dicom.tls",
         "ae_identities needs client certificates"),
        ("tls: {certificate: CERT, key: OTHER_KEY}", "services.a.dicom.tls", "do not load"),
        ("tls: {certificate: CERT, key: /nonexistent.key}", "services.a.dicom.tls.key", "cannot read file"),
        ("tls: {certificate: CERT, key: KEY, profile: legacy}", "services.a.dicom.tls.profile", "bcp195"),
        ("node_tls: {ca: CERT, certificate: CERT}", "services.a.dicom.node_tls", "certificate and key go together"),
        ("node_tls: {certificate: CERT, key: KEY}", "services.a.dicom.node_tls.ca", "required"),
    ],
)  # fmt: skip
def test_a_wrong_tls_block_is_named_with_its_field(pem: dict[str, Path], tls: str, field: str, reason: str) -> None:
    text = tls.replace("OTHER_KEY", str(pem["other_key"])).replace("CERT", str(pem["cert"]))
    text = text.replace("KEY", str(pem["key"]))
    with pytest.raises(ConfigError) as info:
        load_config_text(config(text), FILE)
    (issue,) = info.value.issues
    assert issue.field == field and reason.lower() in issue.reason.lower(), str(issue)
    assert issue.line == 7, str(issue)


def test_client_certificates_and_a_crl_make_a_verifying_context(pem: dict[str, Path]) -> None:
    spec = DicomTlsSpec(certificate=str(pem["cert"]), key=str(pem["key"]), client_certificate="optional",
                        ca=str(pem["other_cert"]), min_version="1.3")  # fmt: skip
    context = listener_context(spec)
    assert context.verify_mode == ssl.CERT_OPTIONAL and context.minimum_version == ssl.TLSVersion.TLSv1_3
    required = listener_context(spec.model_copy(update={"client_certificate": "required"}))
    assert required.verify_mode == ssl.CERT_REQUIRED


def test_identities_are_the_common_names_then_the_dns_alt_names_once_each() -> None:
    certificate = {
        "subject": ((("countryName", "BE"),), (("commonName", "ct01.radiology.test"),)),
        "subjectAltName": (("DNS", "ct01.radiology.test"), ("IP Address", "10.1.2.3"), ("DNS", "ct01")),
    }
    assert identities(certificate) == ("ct01.radiology.test", "ct01")
    assert identities(None) == identities({}) == ()


def test_the_first_ae_title_pattern_that_matches_names_the_identities_that_may_use_it() -> None:
    bound = {"CT01": ("ct01.radiology.test",), "CT*": ("ct-*.radiology.test",), "*": ("admin.test",)}
    assert identity_allows(bound, "CT01", ("CT01.Radiology.test",))  # names compare without case
    assert not identity_allows(bound, "CT01", ("ct-02.radiology.test",))  # CT01's own rule, first
    assert identity_allows(bound, "CT02", ("x", "ct-02.radiology.test"))
    assert identity_allows(bound, "US01", ("admin.test",)) and not identity_allows(bound, "US01", ())
    assert not identity_allows({"CT01": ("ct01",)}, "MR01", ("ct01",))  # not listed: not allowed
