"""``pacslb check FILE``: exit 0 on a valid file; exit 1 listing every error as ``file:line: field: reason``.

These run the real command line (``python -m pacslb check``) the way an administrator would before a
reload; they need no peers.
"""

from __future__ import annotations

import re
from pathlib import Path

import peers

VALID = """\
services:
  dicom:
    listen: 127.0.0.1:11104
    mode: tcp
    balance: leastconn
    persistence: {type: source_ip, timeout: 30m, netmask: 24}
    check: {type: tcp, interval: 2s, timeout: 2s, rise: 2, fall: 3}
    timeouts: {connect: 500ms, client_idle: 12h, server_idle: 12h}
    servers:
      pacs1: 10.0.0.11:104
      pacs2: {address: 10.0.0.12:104, weight: 2}
  query:
    listen: 127.0.0.1:11105
    check: {type: dicom_echo, interval: 5s, timeout: 2s, calling_ae: PACSLB, called_ae: PACS}
    servers: {pacs1: 10.0.0.11:105, pacs2: 10.0.0.12:105}
shutdown_grace: 10s
"""

# Each wrong line is marked with the field that pacslb must name for it.
INVALID = """\
services:
  dicom:
    listen: 127.0.0.1:11104
    persistence: {type: source_ip, timeout: 30}
    check: {type: tcp, interval: 2s, timeout: 2s, rise: 2, fall: 3}
    servers:
      pacs1: pacs1.local:104
      pacs2: {address: 10.0.0.12:104, weight: 999}
      pacs3: 10.0.0.13:104
    colour: blue
  query:
    listen: 127.0.0.1:11104
    servers: {pacs1: 10.0.0.11:105}
"""
EXPECTED = {
    (4, "services.dicom.persistence.timeout"),
    (7, "services.dicom.servers.pacs1.address"),
    (8, "services.dicom.servers.pacs2.weight"),
    (10, "services.dicom.colour"),
    (12, "services.query.listen"),
}


def test_check_accepts_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(VALID)

    result = peers.run_pacslb_cli("check", str(path))

    assert result.returncode == 0, result


def test_check_lists_every_error_with_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(INVALID)

    result = peers.run_pacslb_cli("check", str(path))

    assert result.returncode == 1, result
    located = re.compile(rf"^{re.escape(str(path))}:(\d+): ([\w.]+): (.+)$")
    found = set()
    for line in result.output.splitlines():
        m = located.match(line)
        if m:
            found.add((int(m.group(1)), m.group(2)))
            assert m.group(3).strip(), f"an error without a reason: {line!r}"
    assert found >= EXPECTED, f"missing: {sorted(EXPECTED - found)}\n{result}"
    assert "Traceback" not in result.output, result


def test_check_of_a_missing_file_fails_cleanly(tmp_path: Path) -> None:
    result = peers.run_pacslb_cli("check", str(tmp_path / "nope.yaml"))

    assert result.returncode == 1, result
    assert "nope.yaml" in result.output, result
    assert "Traceback" not in result.output, result
