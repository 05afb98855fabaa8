"""The DICOM Upper Layer as far as a balancer needs it (PS3.8 section 9): sans-IO.

What it does:
- frames PDUs by their 6-byte header (type, reserved, 32-bit big-endian length), never by read sizes;
- parses the A-ASSOCIATE-RQ (PS3.8 9.3.2): called and calling AE titles, application context,
  presentation contexts (abstract and transfer syntaxes), and from the user information item the
  maximum PDU length, implementation class UID and implementation version name;
- parses the A-ASSOCIATE-RJ (9.3.4) and A-ABORT (9.3.8) a node answers with;
- builds the A-ASSOCIATE-RJ and A-ABORT PDUs the balancer sends.

What it must not do: any I/O. Feed it bytes; it returns a result, None for "need more data", or raises
:class:`DicomProtocolError`, which carries the PDU the peer should get (an A-ABORT, or an A-ASSOCIATE-RJ
where PS3.8 says so). Nothing else ever comes out of the parsing functions.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from pacslb.errors import PacslbError


class PDUType(IntEnum):
    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


PDU_HEADER_LENGTH = 6
#: Largest A-ASSOCIATE-RQ accepted. dcmtk's storescu sends about 9.6 KB (it proposes every storage class);
#: 128 presentation contexts with several transfer syntaxes each plus a user identity item stay well
#: under 64 KiB. 256 KiB leaves room for large identity tokens while bounding what a client can hold.
MAX_ASSOCIATE_RQ_LENGTH = 256 * 1024
#: An A-ASSOCIATE-AC mirrors the RQ's contexts; the same bound applies to what a node answers.
MAX_ASSOCIATE_AC_LENGTH = MAX_ASSOCIATE_RQ_LENGTH
#: The DICOM application context name (PS3.7 annex A.2.1), the only one defined.
DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# Item types inside the A-ASSOCIATE-RQ variable part (PS3.8 9.3.2.1 - 9.3.2.3, annex D.3.3)
ITEM_APPLICATION_CONTEXT = 0x10
ITEM_PRESENTATION_CONTEXT_RQ = 0x20
ITEM_ABSTRACT_SYNTAX = 0x30
ITEM_TRANSFER_SYNTAX = 0x40
ITEM_USER_INFORMATION = 0x50
SUB_MAXIMUM_LENGTH = 0x51
SUB_IMPLEMENTATION_CLASS_UID = 0x52
SUB_IMPLEMENTATION_VERSION_NAME = 0x55


class RJResult(IntEnum):
    """A-ASSOCIATE-RJ result (PS3.8 table 9-21)."""

    REJECTED_PERMANENT = 1
    REJECTED_TRANSIENT = 2


class RJSource(IntEnum):
    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RJReason(IntEnum):
    """Reasons by source (PS3.8 table 9-21); values repeat across sources, hence the prefixes."""

    USER_NO_REASON = 1
    USER_APPLICATION_CONTEXT_NOT_SUPPORTED = 2
    USER_CALLING_AE_NOT_RECOGNIZED = 3
    USER_CALLED_AE_NOT_RECOGNIZED = 7
    ACSE_NO_REASON = 1
    ACSE_PROTOCOL_VERSION_NOT_SUPPORTED = 2
    PRESENTATION_TEMPORARY_CONGESTION = 1
    PRESENTATION_LOCAL_LIMIT_EXCEEDED = 2


class AbortSource(IntEnum):
    """A-ABORT source (PS3.8 table 9-26)."""

    SERVICE_USER = 0
    SERVICE_PROVIDER = 2


class AbortReason(IntEnum):
    """A-ABORT reason when the source is the service provider (PS3.8 table 9-26)."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


@dataclass(frozen=True, slots=True)
class Rejection:
    """An A-ASSOCIATE-RJ's three fields."""

    result: int
    source: int
    reason: int

    @property
    def transient(self) -> bool:
        return self.result == RJResult.REJECTED_TRANSIENT

    def __str__(self) -> str:
        return f"{self.result}-{self.source}-{self.reason} ({describe_rejection(self)})"


def build_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): always 10 bytes."""
    return struct.pack(">BBIBBBB", PDUType.A_ASSOCIATE_RJ, 0, 4, 0, result, source, reason)


def build_abort(source: int = AbortSource.SERVICE_PROVIDER, reason: int = AbortReason.NOT_SPECIFIED) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8): always 10 bytes."""
    return struct.pack(">BBIBBBB", PDUType.A_ABORT, 0, 4, 0, 0, source, reason)


class DicomProtocolError(PacslbError):
    """The peer broke the Upper Layer protocol. ``response`` is the PDU to send it before closing."""

    def __init__(self, message: str, response: bytes) -> None:
        self.response = response
        # The AE titles of a request that could be read that far, for the log (None otherwise).
        self.called_ae: str | None = None
        self.calling_ae: str | None = None
        super().__init__(message)

    @classmethod
    def abort(cls, message: str, reason: int = AbortReason.INVALID_PDU_PARAMETER_VALUE) -> DicomProtocolError:
        return cls(message, build_abort(AbortSource.SERVICE_PROVIDER, reason))

    @classmethod
    def reject(cls, message: str, result: int, source: int, reason: int) -> DicomProtocolError:
        return cls(message, build_associate_rj(result, source, reason))


@dataclass(frozen=True, slots=True)
class PresentationContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AssociateRQ:
    """What the balancer reads from an A-ASSOCIATE-RQ; ``raw`` is the whole PDU, to forward unchanged."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    presentation_contexts: tuple[PresentationContext, ...]
    max_pdu_length: int | None  # 0 means unlimited; None when the item is absent
    implementation_class_uid: str | None
    implementation_version_name: str | None
    raw: bytes

    @property
    def abstract_syntaxes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(pc.abstract_syntax for pc in self.presentation_contexts))


def pdu_length(buffer: bytes | bytearray | memoryview) -> int | None:
    """Length of the whole first PDU in ``buffer`` (header included), or None if the header is incomplete."""
    if len(buffer) < PDU_HEADER_LENGTH:
        return None
    return PDU_HEADER_LENGTH + int.from_bytes(buffer[2:6], "big")


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise DicomProtocolError.abort(f"{what} is not ASCII") from None


def _uid(value: bytes, what: str) -> str:
    # UIDs may be padded with a trailing NUL (PS3.5 9.1); tolerate that, and trailing spaces some send.
    return _text(value, what).rstrip("\0 ")


def _ae_title(field: bytes, reason: int) -> str:
    """An AE title field: ASCII (else A-ABORT), without control characters or backslash (PS3.5 6.2, the
    default repertoire), else the A-ASSOCIATE-RJ for that title (``reason``: 3 calling, 7 called)."""
    title = _text(field, "AE title").strip(" ")
    if any(c < " " or c in "\\\x7f" for c in title):
        which = "calling" if reason == RJReason.USER_CALLING_AE_NOT_RECOGNIZED else "called"
        raise DicomProtocolError.reject(
            f"{which} AE title {title!r} has characters outside the default repertoire",
            RJResult.REJECTED_PERMANENT,
            RJSource.SERVICE_USER,
            reason,
        )
    return title


def _items(data: bytes | memoryview, what: str) -> list[tuple[int, bytes]]:
    """Split a run of items (type, reserved, 16-bit length, value) into (type, value) pairs."""
    items: list[tuple[int, bytes]] = []
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < 4:
            raise DicomProtocolError.abort(f"truncated item header in {what}")
        kind = data[pos]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if pos + 4 + length > end:
            raise DicomProtocolError.abort(f"item 0x{kind:02X} in {what} is longer than what contains it")
        items.append((kind, bytes(data[pos + 4 : pos + 4 + length])))
        pos += 4 + length
    return items


def parse_associate_rq(buffer: bytes | bytearray) -> AssociateRQ | None:
    """Parse the A-ASSOCIATE-RQ at the start of ``buffer``.

    Returns:
        The request, or None when more bytes are needed.

    Raises:
        DicomProtocolError: the bytes are not a valid A-ASSOCIATE-RQ. Its ``response`` is what the client
            gets: an A-ASSOCIATE-RJ for an unsupported protocol version (1, 2, 2), an unknown application
            context (1, 1, 2) or a blank AE title (1, 1, 3 / 1, 1, 7); an A-ABORT otherwise.
    """
    if not buffer:
        return None
    if buffer[0] != PDUType.A_ASSOCIATE_RQ:
        raise DicomProtocolError.abort(
            f"first PDU has type 0x{buffer[0]:02X}, expected A-ASSOCIATE-RQ (0x01)",
            AbortReason.UNEXPECTED_PDU if 1 <= buffer[0] <= 7 else AbortReason.UNRECOGNIZED_PDU,
        )
    total = pdu_length(buffer)
    if total is None:
        return None
    if total > PDU_HEADER_LENGTH + MAX_ASSOCIATE_RQ_LENGTH:
        raise DicomProtocolError.abort(
            f"A-ASSOCIATE-RQ of {total} bytes exceeds the limit of {MAX_ASSOCIATE_RQ_LENGTH}",
            AbortReason.INVALID_PDU_PARAMETER_VALUE,
        )
    if total < 74:
        raise DicomProtocolError.abort(f"A-ASSOCIATE-RQ of {total} bytes is shorter than its fixed part (74)")
    if len(buffer) < total:
        return None
    raw = bytes(buffer[:total])
    try:
        return _parse_whole_rq(raw)
    except DicomProtocolError as exc:
        exc.called_ae, exc.calling_ae = _readable_title(raw[10:26]), _readable_title(raw[26:42])
        raise


def _readable_title(field: bytes) -> str | None:
    try:
        return field.decode("ascii").strip(" ") or None
    except UnicodeDecodeError:
        return None


def _parse_whole_rq(raw: bytes) -> AssociateRQ:
    version = int.from_bytes(raw[6:8], "big")
    if not version & 1:
        raise DicomProtocolError.reject(
            f"protocol version 0x{version:04X} not supported",
            RJResult.REJECTED_PERMANENT, RJSource.SERVICE_PROVIDER_ACSE, RJReason.ACSE_PROTOCOL_VERSION_NOT_SUPPORTED,
        )  # fmt: skip
    called = _ae_title(raw[10:26], RJReason.USER_CALLED_AE_NOT_RECOGNIZED)
    calling = _ae_title(raw[26:42], RJReason.USER_CALLING_AE_NOT_RECOGNIZED)
    context_name = ""
    contexts: list[PresentationContext] = []
    max_pdu: int | None = None
    impl_uid: str | None = None
    impl_version: str | None = None
    seen_user_info = False
    for kind, value in _items(memoryview(raw)[74:], "A-ASSOCIATE-RQ"):
        if kind == ITEM_APPLICATION_CONTEXT:
            context_name = _uid(value, "application context name")
        elif kind == ITEM_PRESENTATION_CONTEXT_RQ:
            contexts.append(_presentation_context(value))
        elif kind == ITEM_USER_INFORMATION:
            seen_user_info = True
            for sub, sub_value in _items(value, "user information"):
                if sub == SUB_MAXIMUM_LENGTH:
                    if len(sub_value) != 4:
                        raise DicomProtocolError.abort("maximum length sub-item is not 4 bytes")
                    max_pdu = int.from_bytes(sub_value, "big")
                elif sub == SUB_IMPLEMENTATION_CLASS_UID:
                    impl_uid = _uid(sub_value, "implementation class UID")
                elif sub == SUB_IMPLEMENTATION_VERSION_NAME:
                    impl_version = _text(sub_value, "implementation version name").strip(" \0")
        else:
            raise DicomProtocolError.abort(
                f"unexpected item 0x{kind:02X} in A-ASSOCIATE-RQ", AbortReason.UNEXPECTED_PDU_PARAMETER
            )
    if not context_name:
        raise DicomProtocolError.abort("A-ASSOCIATE-RQ has no application context item")
    if context_name != DICOM_APPLICATION_CONTEXT:
        raise DicomProtocolError.reject(
            f"application context {context_name!r} not supported",
            RJResult.REJECTED_PERMANENT, RJSource.SERVICE_USER, RJReason.USER_APPLICATION_CONTEXT_NOT_SUPPORTED,
        )  # fmt: skip
    if not contexts:
        raise DicomProtocolError.abort("A-ASSOCIATE-RQ proposes no presentation context")
    if not seen_user_info:
        raise DicomProtocolError.abort("A-ASSOCIATE-RQ has no user information item")
    if not calling:
        raise DicomProtocolError.reject(
            "calling AE title is blank",
            RJResult.REJECTED_PERMANENT, RJSource.SERVICE_USER, RJReason.USER_CALLING_AE_NOT_RECOGNIZED,
        )  # fmt: skip
    if not called:
        raise DicomProtocolError.reject(
            "called AE title is blank",
            RJResult.REJECTED_PERMANENT, RJSource.SERVICE_USER, RJReason.USER_CALLED_AE_NOT_RECOGNIZED,
        )  # fmt: skip
    return AssociateRQ(
        protocol_version=version,
        called_ae=called,
        calling_ae=calling,
        application_context=context_name,
        presentation_contexts=tuple(contexts),
        max_pdu_length=max_pdu,
        implementation_class_uid=impl_uid,
        implementation_version_name=impl_version,
        raw=raw,
    )


def _presentation_context(value: bytes) -> PresentationContext:
    if len(value) < 4:
        raise DicomProtocolError.abort("presentation context item shorter than 4 bytes")
    context_id = value[0]
    if context_id % 2 == 0:
        raise DicomProtocolError.abort(f"presentation context ID {context_id} is not odd")
    abstract = ""
    transfers: list[str] = []
    for kind, sub in _items(value[4:], "presentation context"):
        if kind == ITEM_ABSTRACT_SYNTAX:
            abstract = _uid(sub, "abstract syntax name")
        elif kind == ITEM_TRANSFER_SYNTAX:
            transfers.append(_uid(sub, "transfer syntax name"))
        else:
            raise DicomProtocolError.abort(
                f"unexpected sub-item 0x{kind:02X} in presentation context",
                AbortReason.UNEXPECTED_PDU_PARAMETER,
            )
    if not abstract or not transfers:
        raise DicomProtocolError.abort(f"presentation context {context_id} lacks its abstract or transfer syntax")
    return PresentationContext(context_id, abstract, tuple(transfers))


def parse_associate_rj(pdu: bytes) -> Rejection:
    """The result, source and reason of a whole A-ASSOCIATE-RJ PDU.

    Raises:
        DicomProtocolError: it is not a well-formed A-ASSOCIATE-RJ.
    """
    if len(pdu) != 10 or pdu[0] != PDUType.A_ASSOCIATE_RJ:
        raise DicomProtocolError.abort("malformed A-ASSOCIATE-RJ")
    return Rejection(pdu[7], pdu[8], pdu[9])


_RESULTS = {1: "rejected permanent", 2: "rejected transient"}
_REASONS = {
    1: {1: "no reason given", 2: "application context name not supported", 3: "calling AE title not recognized",
        7: "called AE title not recognized"},
    2: {1: "no reason given", 2: "protocol version not supported"},
    3: {1: "temporary congestion", 2: "local limit exceeded"},
}  # fmt: skip
_SOURCES = {1: "service user", 2: "service provider (ACSE)", 3: "service provider (presentation)"}


def describe_rejection(rj: Rejection) -> str:
    """The words of PS3.8 table 9-21 for a rejection, for logs."""
    result = _RESULTS.get(rj.result, f"result {rj.result}")
    source = _SOURCES.get(rj.source, f"source {rj.source}")
    reason = _REASONS.get(rj.source, {}).get(rj.reason, f"reason {rj.reason}")
    return f"{result}, {source}, {reason}"
