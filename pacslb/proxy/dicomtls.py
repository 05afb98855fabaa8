"""DICOM over TLS in mode dicom: the TLS contexts, the certificate's identity, and a connection over a transport.

Theory of operation. A plain dicom service reads and writes its sockets directly and hands them to the
splice relay once a node accepted (pacslb/proxy/dicom.py). TLS needs the bytes to pass through Python:
each side of such an association is a :class:`StreamConn`, an asyncio protocol on a transport (TLS or
plain) that the driver reads whole PDUs from during the negotiation, exactly as from a socket; once a node
accepted, both transports go to the buffered relay (pacslb/proxy/relay.py, ``relay_transports``), which
decrypts and encrypts in this process. A plain side of a TLS association is made a transport too.

Profiles. ``bcp195`` (the default) is what BCP 195 (RFC 9325, with RFC 8996's end of TLS 1.0 and 1.1)
and DICOM PS3.15's BCP 195 profiles ask, as dcmtk's ``--profile-8996``: TLS 1.2 or later, forward-secret
AEAD suites only (ECDHE or DHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3's are all AEAD), no compression,
no renegotiation. ``system`` keeps the system's default cipher policy, still at TLS 1.2 or later.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, cast

from pacslb.config.model import DicomTlsSpec, NodeTlsSpec

#: OpenSSL cipher string of the bcp195 profile for TLS 1.2 (TLS 1.3 suites are set apart and all AEAD).
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"
#: Bytes a connection buffers before it stops reading (a PDU is read whole during the negotiation: the
#: largest the driver accepts is 256 KiB, pacslb/proxy/dicom.py).
HIGH_WATER = 512 * 1024
#: How long closing a TLS connection waits for the peer's close_notify before it closes anyway (asyncio's
#: default, 30 s, would hold the connection, and some nodes with it, that long).
SHUTDOWN_TIMEOUT = 2.0


def _harden(context: ssl.SSLContext, profile: str, min_version: str) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    if profile == "bcp195":
        context.set_ciphers(BCP195_CIPHERS)


def listener_context(spec: DicomTlsSpec) -> ssl.SSLContext:
    """The server-side context of a dicom service's listener."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, spec.profile, spec.min_version)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(spec.certificate, spec.key)
    if spec.client_certificate != "none":
        assert spec.ca is not None  # the config model requires it
        context.load_verify_locations(cafile=spec.ca)
        context.verify_mode = ssl.CERT_REQUIRED if spec.client_certificate == "required" else ssl.CERT_OPTIONAL
        if spec.crl is not None:
            context.load_verify_locations(cafile=spec.crl)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def node_context(spec: NodeTlsSpec) -> ssl.SSLContext:
    """The client-side context toward a dicom service's nodes (their health checks use it too)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context, spec.profile, spec.min_version)
    context.load_verify_locations(cafile=spec.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = spec.server_name is not None
    if spec.certificate is not None and spec.key is not None:
        context.load_cert_chain(spec.certificate, spec.key)
    return context


def identities(certificate: dict[str, Any] | None) -> tuple[str, ...]:
    """The names a verified peer certificate (``SSLObject.getpeercert()``) carries: its subject's common
    names, then its DNS subjectAltNames. Empty without a certificate."""
    if not certificate:
        return ()
    names: list[str] = []
    for rdn in certificate.get("subject", ()):
        names += [value for key, value in rdn if key == "commonName"]
    names += [value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"]
    return tuple(dict.fromkeys(names))


class StreamConn(asyncio.Protocol):
    """One side of an association over a transport: whole reads for the negotiation, then the relay takes
    the transport (``transport.set_protocol``) with whatever is still buffered (:meth:`take`)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost = False
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None  # set while writing is paused

    # -- making one ---------------------------------------------------------------------------------------

    @classmethod
    async def accept(cls, sock: socket.socket, context: ssl.SSLContext | None, timeout: float) -> StreamConn:
        """The accepted ``sock``, with the TLS handshake done when ``context`` is given. Raises OSError,
        ssl.SSLError or TimeoutError (the socket is closed then)."""
        return await cls._open(sock, context, timeout, server_side=True, server_name=None)

    @classmethod
    async def connect(
        cls, sock: socket.socket, context: ssl.SSLContext | None, server_name: str | None, timeout: float
    ) -> StreamConn:
        """The connected ``sock`` to a node, with the TLS handshake done when ``context`` is given (the
        node's certificate checked, and its name when ``server_name`` is given). Raises as :meth:`accept`."""
        return await cls._open(sock, context, timeout, server_side=False, server_name=server_name)

    @classmethod
    async def _open(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext | None,
        timeout: float,
        *,
        server_side: bool,
        server_name: str | None,
    ) -> StreamConn:
        loop = asyncio.get_running_loop()
        conn = cls()
        tls: dict[str, Any] = {}
        if context is not None:
            tls = {"ssl": context, "ssl_handshake_timeout": timeout, "ssl_shutdown_timeout": SHUTDOWN_TIMEOUT}
            if not server_side:
                tls["server_hostname"] = server_name or ""  # "": no name to check (check_hostname is off)
        try:
            async with asyncio.timeout(timeout):
                if server_side:
                    await loop.connect_accepted_socket(lambda: conn, sock=sock, **tls)
                else:
                    await loop.create_connection(lambda: conn, sock=sock, **tls)
        except BaseException:
            conn.abort()
            sock.close()
            raise
        return conn

    # -- asyncio.Protocol -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport (TLS has no half-close; a DICOM peer releases before it closes)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        if self.drained is None:
            self.drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- what the driver uses -------------------------------------------------------------------------------

    async def recv(self) -> bytes:
        """What arrived (b"" once the peer closed). Bounded by the caller's own timeout."""
        while not self.buffer and not self.eof and not self.lost:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.take()

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def send(self, data: bytes) -> None:
        """Write ``data``; wait while the peer is not reading. Raises ConnectionError once the connection is
        gone."""
        if self.lost or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)
        if self.drained is not None:
            await self.drained
            if self.lost:
                raise ConnectionResetError("connection closed")

    def certificate(self) -> dict[str, Any] | None:
        """The peer's verified certificate, or None (plain, or none shown)."""
        if self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        return cast("dict[str, Any] | None", ssl_object.getpeercert())

    def version(self) -> str:
        """The TLS version and cipher, for the log: "TLSv1.3 TLS_AES_256_GCM_SHA384"; "" when plain."""
        if self.transport is None:
            return ""
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return ""
        cipher = ssl_object.cipher()
        return f"{ssl_object.version()} {cipher[0] if cipher else ''}".strip()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()
