"""The role keepalived reports (pacslb/cluster/role.py): kept, logged and told to the event log on a change."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pacslb.admin.events import EventLog
from pacslb.cluster.role import ClusterRole


def test_unknown_until_told_then_each_change_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    events = EventLog()
    role = ClusterRole(events)
    assert (role.role, role.since) == ("unknown", None)
    caplog.set_level(logging.INFO, logger="pacslb.cluster")

    assert role.set("master", "lb1") is True
    assert role.role == "master" and role.since is not None
    assert role.set("master", "lb1") is False  # keepalived may report the same role again: no new line
    assert role.set("fault", "lb1", by="api") is True

    lines = [(r.levelname, r.pacslb_fields) for r in caplog.records if getattr(r, "pacslb_event", None) == "role"]
    assert lines == [
        ("INFO", {"node": "lb1", "old": "unknown", "new": "master", "by": "keepalived"}),
        ("WARNING", {"node": "lb1", "old": "master", "new": "fault", "by": "api"}),
    ]
    assert [(e.kind, e.level, e.fields["new"]) for e in events.since(0)] == [
        ("cluster", "info", "master"),
        ("cluster", "warning", "fault"),
    ]
    assert "lb1 is fault" in events.since(0)[-1].message


def test_a_role_keepalived_does_not_report_is_refused() -> None:
    role = ClusterRole()
    with pytest.raises(ValueError, match="unknown role"):
        role.set("unknown", "lb1")  # type: ignore[arg-type]
    assert role.role == "unknown"


def test_health_and_role_as_keepalived_runs_them_load_neither_pydantic_nor_asyncio(tmp_path: Path) -> None:
    """keepalived runs `python -m pacslb health` every second with a timeout of its own: the shortcut
    (pacslb/cluster/quick.py) must stay light, or a loaded balancer's check times out and the pair flaps."""
    config = tmp_path / "pacslb.yaml"
    config.write_text('services: {}\nadmin: {listen: "127.0.0.1:9"}\n')  # nothing listens on port 9
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['pacslb', 'health', {str(config)!r}, '--timeout', '0.2']\n"
        "try:\n"
        "    runpy.run_module('pacslb', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, 'pydantic' in sys.modules, 'asyncio' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.split() == ["1", "False", "False"], (done.stdout, done.stderr)
    assert "127.0.0.1:9/healthz" in done.stderr
