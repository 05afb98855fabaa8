"""A minimal DICOM Verification SCP for the association-rate case: ``python -m bench.echoscp --port P``.

Owns: answering, on one loopback port, every association that proposes Verification: A-ASSOCIATE-AC to
the A-ASSOCIATE-RQ, C-ECHO-RSP (success) to each C-ECHO-RQ, A-RELEASE-RP to the A-RELEASE-RQ; anything else
gets the connection closed. It exists so that the node is not what limits that case (dcmtk's storescp
handles one association at a time, Orthanc a few hundred a second here), and its answers are checked by
real DICOM clients (echoscu, pynetdicom) in the bench's verification pass. It must not be used for data.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from bench import dicomwire

#: Largest PDU accepted before the connection is dropped (an A-ASSOCIATE-RQ from dcmtk is ~10 KB).
MAX_PDU_BYTES = 256 * 1024


class EchoSCP(asyncio.Protocol):
    """One association: PDUs in, pre-encoded answers out."""

    __slots__ = ("buf", "transport")

    RSP = dicomwire.c_echo_rsp()
    RP = dicomwire.release_rp()

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        header = dicomwire.HEADER
        while len(self.buf) >= header.size:
            pdu_type, length = header.unpack_from(self.buf)
            end = header.size + length
            if end > MAX_PDU_BYTES:
                self.close()
                return
            if len(self.buf) < end:
                return
            pdu, self.buf = self.buf[:end], self.buf[end:]
            self.answer(pdu_type, pdu)

    def answer(self, pdu_type: int, pdu: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if pdu_type == 0x01:
            transport.write(dicomwire.associate_ac(pdu))
        elif pdu_type == dicomwire.P_DATA_TF:
            transport.write(self.RSP)
        elif pdu_type == 0x05:
            transport.write(self.RP)
        else:  # an A-ABORT or anything unexpected
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoSCP, "127.0.0.1", port, backlog=4096, reuse_address=True)
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    async with server:
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echoscp", description="minimal Verification SCP")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
