"""Seed inputs: real first PDUs and request heads, as peers send them.

DICOM: the dcmtk captures kept as golden files (tests/unit/data), A-ASSOCIATE-RQs encoded by pynetdicom
(``A_ASSOCIATE_RQ.encode``, with role selection, user identity, asynchronous operations), and, when the
tools are installed, what dcmtk's echoscu and findscu and a pynetdicom client send to a recording listener
(:func:`capture_first_bytes`). HTTP: what curl (several options) and httpx send to a recording listener,
and heads as Chromium and Firefox send them.

Captured seeds are written to the corpus directory (git-ignored), so a run can be repeated with the same
seeds (``--seeds-from``) on a machine without the tools.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "unit" / "data"
DCMTK_BIN = Path("/usr/bin")  # by path: pynetdicom installs Python scripts with the same names
CAPTURE_TIMEOUT = 10.0

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
MWL_FIND = "1.2.840.10008.5.1.4.31"


# ----------------------------------------------------------------------------------------- capturing


def _whole_dicom_pdu(buffer: bytes) -> bool:
    return len(buffer) >= 6 and len(buffer) >= 6 + struct.unpack(">I", buffer[2:6])[0]


def _whole_http_head(buffer: bytes) -> bool:
    return b"\r\n\r\n" in buffer


def capture_first_bytes(
    run: Callable[[int], object], complete: Callable[[bytes], bool], answer: bytes, timeout: float = CAPTURE_TIMEOUT
) -> bytes | None:
    """Listen on a free loopback port, call ``run(port)`` (which makes a peer connect), record what the peer
    sends until ``complete`` says it is whole, answer ``answer`` and close. None when nothing came."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(timeout)
    port = listener.getsockname()[1]
    captured: list[bytes] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(timeout)
            buffer = b""
            try:
                while not complete(buffer):
                    data = conn.recv(65536)
                    if not data:
                        break
                    buffer += data
                captured.append(buffer)
                conn.sendall(answer)
            except OSError:
                captured.append(buffer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        run(port)
    except (OSError, subprocess.SubprocessError):
        pass
    thread.join(timeout)
    listener.close()
    return captured[0] if captured and captured[0] else None


def _tool(argv: list[str]) -> Callable[[int], object]:
    """A command to run against the recording listener ("{port}" in an argument is its port)."""
    return lambda port: subprocess.run(
        [a.replace("{port}", str(port)) for a in argv],
        capture_output=True,
        timeout=CAPTURE_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


RJ_ANSWER = bytes([0x03, 0, 0, 0, 0, 4, 0, 1, 1, 1])  # A-ASSOCIATE-RJ (1, 1, 1): the tool gives up at once
HTTP_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def _pynetdicom_client(port: int) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="PYNETSCU")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CT_IMAGE_STORAGE)
    ae.acse_timeout = ae.network_timeout = CAPTURE_TIMEOUT
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
    assoc.abort()


def captured_dicom() -> dict[str, bytes]:
    """First PDUs of real clients, captured live (only those whose tool is installed)."""
    found: dict[str, bytes] = {}
    dcmtk = {
        "dcmtk-echoscu": [str(DCMTK_BIN / "echoscu"), "-aet", "MODALITY1", "-aec", "INFINITT", "127.0.0.1", "{port}"],
        "dcmtk-findscu-study": [
            str(DCMTK_BIN / "findscu"), "-S", "-aet", "VIEWER", "-aec", "INFINITT",
            "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=", "127.0.0.1", "{port}",
        ],
        "dcmtk-findscu-mwl": [
            str(DCMTK_BIN / "findscu"), "-W", "-aet", "CT01", "-aec", "MWL", "-k", "PatientName=",
            "127.0.0.1", "{port}",
        ],
    }  # fmt: skip
    for name, argv in dcmtk.items():
        if Path(argv[0]).exists():
            pdu = capture_first_bytes(_tool(argv), _whole_dicom_pdu, RJ_ANSWER)
            if pdu:
                found[name] = pdu
    pdu = capture_first_bytes(_pynetdicom_client, _whole_dicom_pdu, RJ_ANSWER)
    if pdu:
        found["pynetdicom-client"] = pdu
    return found


def captured_http() -> dict[str, bytes]:
    """Request heads of real clients, captured live (curl variants, httpx; only what is installed)."""
    found: dict[str, bytes] = {}
    curl = shutil.which("curl")
    if curl:
        base = "http://127.0.0.1:{port}"
        variants = {
            "curl-get": [curl, "-s", base + "/app/explorer.html?lang=en"],
            "curl-head": [curl, "-s", "-I", base + "/"],
            "curl-http10": [curl, "-s", "-0", base + "/studies"],
            "curl-post-form": [curl, "-s", "-d", "patient=DOE^JOHN&modality=CT", base + "/tools/find"],
            "curl-post-json-expect": [
                curl, "-s", "-H", "Content-Type: application/json", "-d", "{" + '"x":"' + "y" * 1100 + '"}',
                base + "/tools/find",
            ],
            "curl-chunked": [curl, "-s", "-H", "Transfer-Encoding: chunked", "-d", "abc", base + "/instances"],
            "curl-cookie-auth": [
                curl, "-s", "-u", "orthanc:orthanc", "-b", "SERVERID=pacs1; session=abc", base + "/system",
            ],
            "curl-websocket": [
                curl, "-s", "-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13",
                "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", base + "/ws",
            ],
            "curl-options": [curl, "-s", "-X", "OPTIONS", "-H", "Origin: http://viewer", base + "/dicom-web/studies"],
        }  # fmt: skip
        for name, argv in variants.items():
            head = capture_first_bytes(_tool(argv), _whole_http_head, HTTP_ANSWER)
            if head:
                found[name] = head
    for name, head in found.items():  # the listener's port changes from run to run; the seed should not
        found[name] = re.sub(rb"127\.0\.0\.1:\d+", b"pacs.example:8080", head)

    def httpx_get(port: int) -> None:
        import httpx

        httpx.get(f"http://127.0.0.1:{port}/dicom-web/studies?PatientID=1", timeout=CAPTURE_TIMEOUT)

    head = capture_first_bytes(httpx_get, _whole_http_head, HTTP_ANSWER)
    if head:
        found["httpx-get"] = re.sub(rb"127\.0\.0\.1:\d+", b"pacs.example:8080", head)
    return found


# ------------------------------------------------------------------------------------------ building


def pynetdicom_rqs() -> dict[str, bytes]:
    """A-ASSOCIATE-RQs encoded by pynetdicom (PS3.8 9.3.2), with the user information sub-items of PS3.7
    annex D.3.3 that real clients send (role selection, user identity, asynchronous operations window)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        AsynchronousOperationsWindowNegotiation,
        ImplementationClassUIDNotification,
        ImplementationVersionNameNotification,
        MaximumLengthNotification,
        SCP_SCU_RoleSelectionNegotiation,
        UserIdentityNegotiation,
    )
    from pynetdicom.presentation import build_context

    def encode(calling: str, called: str, syntaxes: list[str], extra: list[object]) -> bytes:
        prim = A_ASSOCIATE()
        prim.application_context_name = "1.2.840.10008.3.1.1.1"
        prim.calling_ae_title = calling
        prim.called_ae_title = called
        contexts = [build_context(uid) for uid in syntaxes]
        for i, context in enumerate(contexts):
            context.context_id = 2 * i + 1
        prim.presentation_context_definition_list = contexts
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = 16382
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = "PYNETDICOM_304"
        prim.user_information = [max_length, impl, version, *extra]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(prim)
        return bytes(pdu.encode())

    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT_IMAGE_STORAGE
    role.scu_role = role.scp_role = True
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"radiologist"
    identity.secondary_field = b"secret"
    identity.positive_response_requested = True
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    return {
        "pynetdicom-echo": encode("ECHOSCU", "ANY-SCP", [VERIFICATION], []),
        "pynetdicom-store-role": encode("CT01", "INFINITT", [CT_IMAGE_STORAGE, VERIFICATION], [role]),
        "pynetdicom-find-identity": encode("VIEWER", "INFINITT", [STUDY_ROOT_FIND], [identity]),
        "pynetdicom-mwl-async": encode("US02", "MWL", [MWL_FIND, VERIFICATION], [window, identity]),
    }


def other_pdus() -> dict[str, bytes]:
    """First PDUs a client should not send (the parser's other branches): A-ABORT, A-RELEASE-RQ, P-DATA-TF."""
    return {
        "a-abort": bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]),
        "a-release-rq": bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]),
        "p-data-tf": bytes([0x04, 0, 0, 0, 0, 12]) + struct.pack(">I", 8) + bytes([1, 0x03]) + b"\0\0\0\0\x08\0",
    }


# Heads as browsers send them to a PACS web viewer (Chromium 120 on Linux, Firefox 121): the shape
# (field order, Accept values, Sec-Fetch-*, cookies) matters more than the exact values.
BROWSER_HEADS = {
    "chromium-get": (
        b"GET /app/explorer.html HTTP/1.1\r\nHost: pacs.example:8080\r\nConnection: keep-alive\r\n"
        b'sec-ch-ua: "Chromium";v="120", "Not?A_Brand";v="8"\r\nsec-ch-ua-mobile: ?0\r\n'
        b'sec-ch-ua-platform: "Linux"\r\nUpgrade-Insecure-Requests: 1\r\n'
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 "
        b"Safari/537.36\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
        b"image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7\r\nSec-Fetch-Site: none\r\n"
        b"Sec-Fetch-Mode: navigate\r\nSec-Fetch-User: ?1\r\nSec-Fetch-Dest: document\r\n"
        b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
        b"Cookie: SERVERID=pacs2; JSESSIONID=8F3A2C1B\r\n\r\n"
    ),
    "firefox-xhr-post": (
        b"POST /tools/find HTTP/1.1\r\nHost: pacs.example\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0\r\n"
        b"Accept: application/json, text/plain, */*\r\nAccept-Language: en-US,en;q=0.5\r\n"
        b"Accept-Encoding: gzip, deflate\r\nContent-Type: application/json\r\nContent-Length: 43\r\n"
        b"Origin: http://pacs.example\r\nConnection: keep-alive\r\nReferer: http://pacs.example/app/explorer.html\r\n"
        b"Cookie: SERVERID=pacs1\r\nSec-Fetch-Dest: empty\r\nSec-Fetch-Mode: cors\r\nSec-Fetch-Site: same-origin\r\n"
        b'\r\n{"Level":"Study","Query":{"PatientID":"*"}}'
    ),
    "chromium-websocket": (
        b"GET /ws HTTP/1.1\r\nHost: pacs.example\r\nConnection: Upgrade\r\nPragma: no-cache\r\n"
        b"Cache-Control: no-cache\r\nUpgrade: websocket\r\nOrigin: http://pacs.example\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
    ),
    "pipelined-pair": b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nHEAD /b HTTP/1.1\r\nHost: h\r\n\r\n",
}


def golden_dicom() -> dict[str, bytes]:
    return {path.stem: path.read_bytes() for path in sorted(GOLDEN.glob("*.bin"))}


def build(kind: str, live: bool) -> dict[str, bytes]:
    """The seeds of ``kind`` ("dicom" or "http"), with live captures when ``live``."""
    if kind == "dicom":
        seeds = {**golden_dicom(), **pynetdicom_rqs(), **other_pdus()}
        if live:
            seeds.update(captured_dicom())
    else:
        seeds = dict(BROWSER_HEADS)
        if live:
            seeds.update(captured_http())
    return seeds


def write(seeds: dict[str, bytes], directory: Path) -> None:
    """Store seeds as files named by their origin and a digest (libFuzzer reads the directory as is)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        digest = hashlib.sha1(data).hexdigest()[:12]
        (directory / f"{name}-{digest}").write_bytes(data)


def load(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}
