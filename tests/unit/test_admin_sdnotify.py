"""systemd notifications (pacslb/admin/sdnotify.py) on a datagram socket standing in for systemd."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pacslb.admin import sdnotify


def test_messages_reach_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.ready("2 services")
        assert sock.recv(1024) == b"READY=1\nSTATUS=2 services"
        assert sdnotify.reloading()
        assert sock.recv(1024).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert sdnotify.stopping()
        assert sock.recv(1024).startswith(b"STOPPING=1")


def test_without_systemd_nothing_is_sent_and_nothing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/socket")
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval_is_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert sdnotify.watchdog_interval() is None
