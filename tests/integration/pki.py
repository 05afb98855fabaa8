"""A throwaway certificate authority for the TLS tests, made with the openssl command.

``TestCA(folder)`` makes a CA (EC P-256); :meth:`TestCA.issue` makes a key and a certificate it signs, with
the given common name, DNS names and 127.0.0.1 as subjectAltNames, usable by a server and a client;
:meth:`TestCA.revoke` revokes one and writes the CRL. Everything lives in the folder and lasts two days.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Issued:
    name: str
    key: Path
    certificate: Path


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, folder: Path, name: str = "pacslb test CA") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key = folder / "ca.key"
        self.certificate = folder / "ca.pem"
        self.crl = folder / "crl.pem"
        (folder / "index.txt").write_text("")
        (folder / "crlnumber").write_text("01\n")
        self.config = folder / "ca.cnf"
        self.config.write_text(
            "[ca]\ndefault_ca = test\n"
            "[test]\n"
            f"database = {folder / 'index.txt'}\ncrlnumber = {folder / 'crlnumber'}\n"
            f"certificate = {self.certificate}\nprivate_key = {self.key}\n"
            "default_md = sha256\ndefault_crl_days = 2\n"
        )
        self._run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(self.key), "-out", str(self.certificate), "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        self.write_crl()

    def _run(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=OPENSSL_TIMEOUT)

    def issue(self, name: str, *dns: str) -> Issued:
        """A key and a certificate for ``name`` (its CN; also a DNS subjectAltName, with ``dns``)."""
        key, csr, certificate = (self.folder / f"{name}.{kind}" for kind in ("key", "csr", "pem"))
        extensions = self.folder / f"{name}.ext"
        names = ",".join([f"DNS:{n}" for n in (name, *dns)] + ["IP:127.0.0.1"])
        extensions.write_text(
            f"subjectAltName = {names}\nbasicConstraints = CA:FALSE\n"
            "keyUsage = digitalSignature\nextendedKeyUsage = serverAuth,clientAuth\n"
        )
        self._run(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        )  # fmt: skip
        self._run(
            "x509", "-req", "-in", str(csr), "-CA", str(self.certificate), "-CAkey", str(self.key),
            "-CAcreateserial", "-out", str(certificate), "-days", "2", "-extfile", str(extensions),
        )  # fmt: skip
        return Issued(name, key, certificate)

    def revoke(self, issued: Issued) -> None:
        self._run("ca", "-config", str(self.config), "-revoke", str(issued.certificate))
        self.write_crl()

    def write_crl(self) -> None:
        self._run("ca", "-config", str(self.config), "-gencrl", "-out", str(self.crl))
