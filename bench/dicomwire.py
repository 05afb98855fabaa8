"""The few DICOM upper-layer PDUs the C-ECHO load generator sends, pre-encoded, and the checks on what comes back.

Owns: the bytes of an A-ASSOCIATE-RQ proposing Verification (PS3.8 9.3.2), a P-DATA-TF carrying a C-ECHO-RQ
command set (PS3.7 9.3.5, implicit VR little endian), an A-RELEASE-RQ (PS3.8 9.3.6), and reading the
status out of a C-ECHO-RSP. Encoding is done once, so a benchmark association costs the client a handful
of socket calls and no Python DICOM work. It must not do I/O.
"""

from __future__ import annotations

import struct

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
#: An implementation class UID under the 2.25 (UUID-derived) root, made up for this benchmark client.
IMPLEMENTATION_CLASS_UID = "2.25.186475311270985318216416458931063493765"
IMPLEMENTATION_VERSION = "PACSLB_BENCH"
MAX_PDU = 16384

A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RP = 0x06
A_ABORT = 0x07
#: PDU header: type (1), reserved (1), length (4, big endian).
HEADER = struct.Struct(">BxI")
STATUS_TAG = (0x0000, 0x0900)


def _ae(title: str) -> bytes:
    raw = title.encode("ascii")
    if not 0 < len(raw) <= 16:
        raise ValueError(f"AE title must be 1 to 16 characters: {title!r}")
    return raw.ljust(16, b" ")


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def associate_rq(calling_ae: str, called_ae: str) -> bytes:
    """An A-ASSOCIATE-RQ proposing one presentation context: Verification, implicit VR little endian."""
    presentation = struct.pack(">B3x", 1) + _item(0x30, _uid(VERIFICATION_SOP_CLASS))
    presentation += _item(0x40, _uid(IMPLICIT_VR_LITTLE_ENDIAN))
    user = _item(0x51, struct.pack(">I", MAX_PDU))
    user += _item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
    user += _item(0x55, IMPLEMENTATION_VERSION.encode("ascii"))
    items = _item(0x10, _uid(APPLICATION_CONTEXT)) + _item(0x20, presentation) + _item(0x50, user)
    body = struct.pack(">H2x", 1) + _ae(called_ae) + _ae(calling_ae) + bytes(32) + items
    return HEADER.pack(0x01, len(body)) + body


def _element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def c_echo_rq(message_id: int = 1) -> bytes:
    """A P-DATA-TF with one PDV: the complete C-ECHO-RQ command set, on presentation context 1."""
    sop = _uid(VERIFICATION_SOP_CLASS)
    if len(sop) % 2:
        sop += b"\0"  # UI values are padded to even length with a NUL
    elements = _element(0x0000, 0x0002, sop)
    elements += _element(0x0000, 0x0100, struct.pack("<H", 0x0030))  # C-ECHO-RQ
    elements += _element(0x0000, 0x0110, struct.pack("<H", message_id))
    elements += _element(0x0000, 0x0800, struct.pack("<H", 0x0101))  # no data set
    command = _element(0x0000, 0x0000, struct.pack("<I", len(elements))) + elements
    pdv = struct.pack(">IBB", len(command) + 2, 1, 0x03) + command  # command, last fragment
    return HEADER.pack(P_DATA_TF, len(pdv)) + pdv


def release_rq() -> bytes:
    return HEADER.pack(0x05, 4) + bytes(4)


def echo_status(p_data: bytes) -> int | None:
    """The Status (0000,0900) of the command in a P-DATA-TF PDU (header included), or None if absent."""
    pos = HEADER.size
    while pos + 6 <= len(p_data):
        (length,) = struct.unpack_from(">I", p_data, pos)
        control = p_data[pos + 5]
        value = p_data[pos + 6 : pos + 4 + length]
        pos += 4 + length
        if not control & 0x01:
            continue  # a data set fragment, not the command
        at = 0
        while at + 8 <= len(value):
            group, element, size = struct.unpack_from("<HHI", value, at)
            if (group, element) == STATUS_TAG and size == 2:
                status: int = struct.unpack_from("<H", value, at + 8)[0]
                return status
            at += 8 + size
    return None


def associate_ac(rq: bytes) -> bytes:
    """An A-ASSOCIATE-AC accepting presentation context 1 (implicit VR little endian) of ``rq``.

    The AE title fields are returned as the RQ had them (PS3.8 9.3.3: sent back, not tested).
    """
    presentation = struct.pack(">BxBx", 1, 0) + _item(0x40, _uid(IMPLICIT_VR_LITTLE_ENDIAN))
    user = _item(0x51, struct.pack(">I", MAX_PDU))
    user += _item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
    user += _item(0x55, IMPLEMENTATION_VERSION.encode("ascii"))
    items = _item(0x10, _uid(APPLICATION_CONTEXT)) + _item(0x21, presentation) + _item(0x50, user)
    body = struct.pack(">H2x", 1) + rq[10:42] + bytes(32) + items
    return HEADER.pack(A_ASSOCIATE_AC, len(body)) + body


def c_echo_rsp(message_id: int = 1) -> bytes:
    """A P-DATA-TF with a C-ECHO-RSP command set, status 0000 (success), on presentation context 1."""
    sop = _uid(VERIFICATION_SOP_CLASS)
    if len(sop) % 2:
        sop += b"\0"
    elements = _element(0x0000, 0x0002, sop)
    elements += _element(0x0000, 0x0100, struct.pack("<H", 0x8030))  # C-ECHO-RSP
    elements += _element(0x0000, 0x0120, struct.pack("<H", message_id))
    elements += _element(0x0000, 0x0800, struct.pack("<H", 0x0101))
    elements += _element(0x0000, 0x0900, struct.pack("<H", 0x0000))
    command = _element(0x0000, 0x0000, struct.pack("<I", len(elements))) + elements
    pdv = struct.pack(">IBB", len(command) + 2, 1, 0x03) + command
    return HEADER.pack(P_DATA_TF, len(pdv)) + pdv


def release_rp() -> bytes:
    return HEADER.pack(A_RELEASE_RP, 4) + bytes(4)
