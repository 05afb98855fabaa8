"""Values a client chooses reach pacslb's log escaped: calling and called AE titles with a terminal escape
sequence, a bell and a carriage return. The log file is read as bytes, as a terminal or journald gets it.
(The JSON format, and every control character, are covered by tests/unit/test_logs.py; an HTTP path or
header with a control character never reaches the log: the parser refuses it first.)
"""

from __future__ import annotations

from collections.abc import Callable

import peers
from peers import EchoSCP, PacslbProcess

PacslbFactory = Callable[[str], PacslbProcess]


def test_hostile_ae_titles_are_escaped(pacslb: PacslbFactory) -> None:
    calling = "\x1b[2J\x1b[31mX\x07"  # clear the screen, red, bell: 11 characters (an AE title has 16)
    called = "PACS\rFAKE\x00"
    with EchoSCP() as node:
        port = peers.free_port()
        lb = pacslb(peers.config_text({"dicom": peers.dicom_service(port, {"pacs1": node.address})}, workers=1))
        answer = peers.raw_exchange(port, peers.associate_rq_pdu(called=called, calling=calling))
        assert answer.pdu_type == peers.PDU_ASSOCIATE_RJ, answer  # outside the default repertoire (PS3.5 6.2)
        line = lb.wait_event("assoc", 10.0)
    assert line.get("calling") == "\\x1b[2J\\x1b[31mX\\x07", line.line
    assert line.get("called") == "PACS\\x0dFAKE\\x00", line.line
    log = lb.log_path.read_bytes()
    assert b"\x1b" not in log and b"\x07" not in log and b"\r" not in log and b"\x00" not in log
    assert all(byte >= 0x20 or byte == 0x0A for byte in log)
