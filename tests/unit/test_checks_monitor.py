"""Rise and fall: how check results move a server between up and down (Monitor.apply, no network)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacslb.balance.server import ServerState
from pacslb.checks.base import CheckResult, TlsTarget
from pacslb.checks.monitor import Monitor
from pacslb.config.model import CheckSpec

OK = CheckResult(True, "connected", 0.001)
FAIL = CheckResult(False, "connection refused", 0.002)


def make_monitor(rise: int = 2, fall: int = 3) -> tuple[Monitor, ServerState, list[tuple[str, str]]]:
    server = ServerState("pacs1", "127.0.0.1", 104)
    changes: list[tuple[str, str]] = []
    spec = CheckSpec(type="tcp", rise=rise, fall=fall)
    monitor = Monitor("dicom", spec, server, lambda s, old, new, r: changes.append((old, new)))
    return monitor, server, changes


def test_a_server_starts_up_and_one_failure_does_not_take_it_down() -> None:
    monitor, server, changes = make_monitor(fall=3)
    assert server.health == "up"
    monitor.apply(FAIL)
    monitor.apply(FAIL)
    assert server.health == "up" and changes == []
    monitor.apply(FAIL)
    assert server.health == "down" and changes == [("up", "down")]


def test_a_success_resets_the_failure_streak() -> None:
    monitor, server, _ = make_monitor(fall=2)
    for result in (FAIL, OK, FAIL, OK, FAIL):
        monitor.apply(result)
    assert server.health == "up"


def test_rise_successes_bring_a_down_server_back() -> None:
    monitor, server, changes = make_monitor(rise=3, fall=1)
    monitor.apply(FAIL)
    assert server.health == "down"
    monitor.apply(OK)
    monitor.apply(OK)
    assert server.health == "down"
    monitor.apply(OK)
    assert server.health == "up"
    assert changes == [("up", "down"), ("down", "up")]


def test_state_change_is_logged_on_one_line_with_reason_and_duration(caplog: pytest.LogCaptureFixture) -> None:
    monitor, _, _ = make_monitor(fall=1)
    with caplog.at_level(logging.INFO, logger="pacslb.health"):
        monitor.apply(FAIL)
    (record,) = caplog.records
    fields = record.pacslb_fields  # type: ignore[attr-defined]
    assert record.pacslb_event == "health"  # type: ignore[attr-defined]
    assert fields["service"] == "dicom" and fields["server"] == "pacs1"
    assert (fields["old"], fields["new"]) == ("up", "down")
    assert fields["reason"] == "connection refused"
    assert fields["check_duration"] == pytest.approx(0.002)


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_health_follows_the_last_rise_or_fall_streak(results: list[bool], rise: int, fall: int) -> None:
    monitor, server, _ = make_monitor(rise=rise, fall=fall)
    expected = "up"
    streak_ok = streak_fail = 0
    for ok in results:
        monitor.apply(OK if ok else FAIL)
        streak_ok, streak_fail = (streak_ok + 1, 0) if ok else (0, streak_fail + 1)
        if expected == "up" and streak_fail >= fall:
            expected = "down"
        elif expected == "down" and streak_ok >= rise:
            expected = "up"
        assert server.health == expected


def test_a_hanging_check_counts_as_failed_after_its_timeout() -> None:
    async def scenario() -> tuple[str, str]:
        server = ServerState("pacs1", "127.0.0.1", 104)
        spec = CheckSpec(type="tcp", interval="200ms", timeout="50ms", rise=1, fall=1)
        monitor = Monitor("dicom", spec, server)

        async def hangs(spec: CheckSpec, host: str, port: int, tls: TlsTarget | None, prefix: bytes) -> CheckResult:
            await asyncio.sleep(3600)
            return OK

        monitor._check = hangs  # the check kind under test: one that never answers
        monitor.start()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if monitor.last is not None:
                break
        await monitor.stop()
        assert monitor.last is not None
        return server.health, monitor.last.reason

    health, reason = asyncio.run(scenario())
    assert health == "down"
    assert reason == "no answer within 0.05s"


@pytest.mark.parametrize("waiting_in", ["check", "wake"])
def test_stop_ends_the_monitor_even_when_its_wait_completes_in_the_same_instant(waiting_in: str) -> None:
    """A stop that lands in the very loop iteration where the awaited check (or wake) completes must still
    end the monitor: a swallowed cancellation would leave it checking forever and hang the shutdown."""

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        server = ServerState("pacs1", "127.0.0.1", 104)
        spec = CheckSpec(type="tcp", interval="10s", timeout="10s", rise=1, fall=1)
        monitor = Monitor("dicom", spec, server)
        answer: asyncio.Future[CheckResult] = loop.create_future()
        runs = 0

        async def waits_for_answer(
            spec: CheckSpec, host: str, port: int, tls: TlsTarget | None, prefix: bytes
        ) -> CheckResult:
            nonlocal runs
            runs += 1
            return OK if runs > 1 else await answer

        monitor._check = waits_for_answer
        monitor.start()
        await asyncio.sleep(0.01)  # the first check is waiting for its answer
        if waiting_in == "wake":
            answer.set_result(OK)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if monitor.last is not None:
                    break
            await asyncio.sleep(0.2)  # past MIN_CHECK_GAP: waiting for a wake or the interval
            monitor.wake()
        else:
            answer.set_result(OK)
        task = monitor._task
        assert task is not None
        task.cancel()  # what stop() does first, here in the same instant as the completion
        await asyncio.wait([task], timeout=2)
        ended = task.done()
        monitor._task = None
        if not ended:
            task.cancel()  # clean up after the failed assertion
        return ended

    assert asyncio.run(scenario()) is True


def test_stop_is_bounded_even_for_a_check_that_ignores_its_cancellation(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A check kind that swallowed its cancellation would keep its monitor running: stop() gives up on it
    after STOP_TIMEOUT and says so, rather than hold up a shutdown or reload for ever."""
    monkeypatch.setattr("pacslb.checks.monitor.STOP_TIMEOUT", 0.2)

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        server = ServerState("pacs1", "127.0.0.1", 104)
        monitor = Monitor("dicom", CheckSpec(type="tcp", interval="10s", timeout="10s"), server)
        release: asyncio.Future[None] = loop.create_future()

        async def stubborn(spec: CheckSpec, host: str, port: int, tls: TlsTarget | None, prefix: bytes) -> CheckResult:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await release  # carries on instead of ending
            return OK

        monitor._check = stubborn
        monitor.start()
        task = monitor._task
        assert task is not None
        await asyncio.sleep(0.05)
        await asyncio.wait_for(monitor.stop(), 2)  # returns: bounded by STOP_TIMEOUT
        still_running = not task.done()
        release.set_result(None)  # let it end now
        task.cancel()
        await asyncio.wait([task], timeout=2)
        return still_running

    with caplog.at_level(logging.ERROR, logger="pacslb.health"):
        assert asyncio.run(scenario()) is True
    assert "did not stop within 0.2s" in caplog.text
