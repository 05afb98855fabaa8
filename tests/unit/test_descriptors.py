"""Running out of file descriptors: the rate-limited record, the maxconn arithmetic, the reserve, the limit
raise, and a health check that fails for pacslb's own reason (pacslb/descriptors.py, pacslb/checks/)."""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from pacslb import descriptors
from pacslb.balance.server import ServerState
from pacslb.checks.base import CheckResult, local_result
from pacslb.checks.monitor import Monitor
from pacslb.config.model import CheckSpec
from pacslb.descriptors import Exhaustion, capacity_warning, descriptors_needed, health, is_local, reserve


class FakeLoop:
    """call_later and a clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Callable[[], object]]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], object]) -> object:
        self.timers.append((self.now + delay, callback))
        return object()

    def advance(self, seconds: float) -> None:
        """Move the clock, running the timers that fall due on the way, in order."""
        end = self.now + seconds
        while True:
            due = sorted((t for t in self.timers if t[0] <= end), key=lambda t: t[0])
            if not due:
                break
            when, callback = due[0]
            self.timers.remove(due[0])
            self.now = when
            callback()
        self.now = end


def recorder(loop: FakeLoop) -> tuple[Exhaustion, list[tuple[str, dict[str, Any]]]]:
    lines: list[tuple[str, dict[str, Any]]] = []
    exhaustion = Exhaustion(interval=1.0, recent=10.0, clock=loop.time, emit=lambda e, _lvl, f: lines.append((e, f)))
    return exhaustion, lines


@pytest.fixture(autouse=True)
def _exhaustion_forgotten_after() -> Any:
    """The process-wide count outlives a test: what one notes here must not make a later test's /healthz
    report this process out of descriptors (the tests may run in any order, in one process)."""
    last = descriptors.EXHAUSTION.last
    yield
    descriptors.EXHAUSTION.last = last


def test_a_storm_of_occurrences_makes_one_line_a_second_with_the_counts() -> None:
    loop = FakeLoop()
    exhaustion, lines = recorder(loop)
    for _ in range(5000):  # 5,000 a second for 3 seconds, as a spinning accept would
        for _ in range(5):
            exhaustion.note("accept", "too many open files", loop)
            loop.advance(0.0001)
        loop.advance(3.0 / 5000 - 0.0005)
    loop.advance(1.5)  # the timer writes the last second's count
    assert lines[0] == (
        "descriptors_exhausted",
        {"count": 1, "where": "accept", "total": 1, "limit": descriptors.limit(), "reason": "too many open files"},
    )
    exhausted = [f for e, f in lines if e == "descriptors_exhausted"]
    assert 3 <= len(exhausted) <= 5  # the first at once, then one a second
    assert sum(f["count"] for f in exhausted) == exhaustion.total == 25000
    assert exhaustion.by_place["accept"] == 25000
    assert exhaustion.exhausted()


def test_the_last_count_is_flushed_by_the_timer_and_the_episode_ends_with_one_ok_line() -> None:
    loop = FakeLoop()
    exhaustion, lines = recorder(loop)
    exhaustion.note("accept", "too many open files", loop)
    exhaustion.note("connect", "too many open files", loop)
    exhaustion.note("connect", "too many open files", loop)
    assert [f["count"] for _, f in lines] == [1]
    loop.advance(1.5)  # nothing more happens: the timer writes what was counted
    assert lines[1] == (
        "descriptors_exhausted",
        {
            "count": 2,
            "where": "connect",
            "total": 3,
            "limit": descriptors.limit(),
            "reason": "too many open files",
        },
    )
    assert health(exhaustion)["ok"] is False
    assert health(exhaustion)["reason"] == "descriptors_exhausted"
    loop.advance(8.0)
    assert exhaustion.exhausted() and len(lines) == 2  # quiet, but still recent
    loop.advance(1.0)
    assert not exhaustion.exhausted()
    assert lines[2][0] == "descriptors_ok"
    assert health(exhaustion) == {"ok": True}
    loop.advance(60.0)
    assert len(lines) == 3 and not loop.timers  # nothing left ticking
    exhaustion.note("accept", "too many open files", loop)  # a new episode starts with a line at once
    assert len(lines) == 4 and lines[3][1]["count"] == 1


def test_quiet_counts_without_lines_and_listeners_hear_every_occurrence() -> None:
    loop = FakeLoop()
    exhaustion, lines = recorder(loop)
    heard: list[int] = []
    exhaustion.on_exhausted(lambda: heard.append(1))
    exhaustion.quiet = True
    exhaustion.note("worker_receive")
    exhaustion.note("worker_receive")
    loop.advance(20.0)
    assert not lines and exhaustion.total == 2 and len(heard) == 2


def test_a_listener_that_raises_does_not_stop_the_count() -> None:
    loop = FakeLoop()
    exhaustion, _ = recorder(loop)

    def boom() -> None:
        raise RuntimeError("a bug")

    exhaustion.on_exhausted(boom)
    exhaustion.note("accept")
    exhaustion.off(boom)
    exhaustion.note("accept")
    assert exhaustion.total == 2


def test_maxconn_arithmetic() -> None:
    per, base = descriptors.DESCRIPTORS_PER_CONNECTION, descriptors.BASE_DESCRIPTORS
    assert descriptors_needed([100, 50]) == 150 * per + base
    assert descriptors_needed([100], workers=3) == 100 * per + base + 4  # two control sockets
    # The default maxconn (4,096) of one service does not fit in the common 1,024.
    warning = capacity_warning({"dicom": 4096}, 1024)
    assert warning is not None
    assert warning["limit"] == 1024 and warning["needed"] == 4096 * per + base and warning["maxconn"] == 4096
    assert warning["connections_that_fit"] == (1024 - base - reserve(1024)) // per
    # Four services of 4,096 fit once the limit was raised to a typical hard limit.
    assert capacity_warning({"a": 4096, "b": 4096, "c": 4096, "d": 4096}, 524288) is None
    exactly = descriptors_needed([1000])
    assert capacity_warning({"a": 1000}, exactly) is None
    assert capacity_warning({"a": 1000}, exactly - 1) is not None
    assert capacity_warning({"a": 4096}, 50)["connections_that_fit"] == 0  # type: ignore[index]


def test_the_reserve_is_an_eighth_of_a_small_limit_and_32_of_a_large_one() -> None:
    assert reserve(256) == 32
    assert reserve(64) == 8
    assert reserve(1024) == 32 and reserve(1 << 20) == 32
    assert reserve(4) == 1


def test_local_errors_are_recognised_through_exception_chains() -> None:
    assert is_local(OSError(errno.EMFILE, "Too many open files"))
    assert is_local(OSError(errno.ENFILE, "Too many open files in system"))
    assert not is_local(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as exc:
            raise httpx.ConnectError("All connection attempts failed") from exc
    except httpx.ConnectError as wrapped:
        assert is_local(wrapped)
        result = local_result(wrapped)
    assert result is not None and result.local and not result.ok
    assert result.reason == "not checked: too many open files"
    assert local_result(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None


def test_a_check_that_fails_for_a_local_reason_keeps_the_node_up_and_its_streaks() -> None:
    spec = CheckSpec(type="tcp", interval="1s", timeout="1s", rise=2, fall=2)
    server = ServerState("pacs1", "127.0.0.1", 104, 1)
    monitor = Monitor("dicom", spec, server)
    local = CheckResult(False, "not checked: too many open files", local=True)
    before = descriptors.EXHAUSTION.by_place["check"]
    monitor.apply(CheckResult(False, "connection refused"))
    for _ in range(10):
        monitor.apply(local)
    assert server.health == "up" and monitor.local_failures == 10
    assert descriptors.EXHAUSTION.by_place["check"] == before + 10
    assert monitor.last is not None and monitor.last.reason == "connection refused"
    monitor.apply(CheckResult(False, "connection refused"))  # the second real failure in a row: fall 2
    assert server.health == "down"
    for _ in range(5):
        monitor.apply(local)
    assert server.health == "down"  # nor does a local failure bring a node back
    monitor.apply(CheckResult(True, "connected"))
    monitor.apply(CheckResult(True, "connected"))
    assert server.health == "up"


@pytest.mark.parametrize(("soft", "hard"), [(256, 1024), (1024, 1024)])
def test_the_soft_limit_is_raised_to_the_hard_one(soft: int, hard: int) -> None:
    code = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
        "from pacslb import descriptors\n"
        "print(descriptors.raise_limit(), resource.getrlimit(resource.RLIMIT_NOFILE), descriptors.limit())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split("\n")[0] == f"({soft}, {hard}) ({hard}, {hard}) {hard}"


def test_a_limit_raised_behind_our_back_moves_the_reserve_with_it() -> None:
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024))\n"
        "from pacslb import descriptors\n"
        "before = descriptors.in_reserve(230)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))\n"
        "print(before, descriptors.in_reserve(230), descriptors.in_reserve(1000), descriptors.limit())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split("\n")[0] == "True False True 1024"
