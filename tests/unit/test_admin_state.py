"""Admin states as recorded (pacslb/admin/state.py): precedence, the file, and a broken file."""

from __future__ import annotations

import json
from pathlib import Path

from pacslb.admin.state import AdminStates


def test_per_service_setting_wins_over_the_node_wide_one_and_online_clears() -> None:
    states = AdminStates()
    states.set_admin("pacs2", "drain")
    assert states.admin("dicom", "pacs2") == states.admin("web", "pacs2") == "drain"
    states.set_admin("pacs2", "halt", service="dicom")
    assert states.admin("dicom", "pacs2") == "halt" and states.admin("web", "pacs2") == "drain"
    states.set_admin("pacs2", "drain", service="dicom")  # back to what the node has: no separate record
    assert ("dicom", "pacs2") not in states.servers
    states.set_admin("pacs2", "online")  # online everywhere clears every record of the node
    assert states.nodes == {} and states.servers == {}
    assert states.admin("dicom", "pacs1") == "online"


def test_weights_fall_back_to_the_config() -> None:
    states = AdminStates()
    assert states.weight("dicom", "pacs1") is None
    states.set_weight("pacs1", 3)
    states.set_weight("pacs1", 0, service="web")
    assert states.weight("dicom", "pacs1") == 3 and states.weight("web", "pacs1") == 0
    states.set_weight("pacs1", None)
    assert states.weight("web", "pacs1") is None and states.servers == {}


def test_the_file_round_trips_and_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    states = AdminStates(str(path))
    states.set_admin("pacs2", "drain")
    states.set_admin("pacs3", "halt", service="dicom")
    states.set_weight("pacs1", 5, service="web")
    assert json.loads(path.read_text()) == {
        "version": 1,
        "nodes": {"pacs2": {"admin": "drain"}},
        "servers": {"dicom/pacs3": {"admin": "halt"}, "web/pacs1": {"weight": 5}},
    }
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind
    loaded = AdminStates.load(str(path))
    assert loaded.admin("web", "pacs2") == "drain" and loaded.admin("dicom", "pacs3") == "halt"
    assert loaded.weight("web", "pacs1") == 5


def test_a_broken_file_is_ignored_with_a_log_line(tmp_path: Path, capsys: object) -> None:
    path = tmp_path / "state.json"
    for text in ("{not json", json.dumps({"version": 99}), json.dumps({"version": 1, "nodes": {"p": {"admin": "x"}}})):
        path.write_text(text)
        states = AdminStates.load(str(path))
        assert states.nodes == {} and states.servers == {} and states.path == str(path)
    assert AdminStates.load(str(tmp_path / "missing.json")).nodes == {}
