"""Fixtures for integration tests against real peers (see peers.py for the theory of operation).

- ``orthanc_nodes(n)``: start n Orthanc nodes (pacs1..pacsN); all are stopped and reaped at teardown.
- ``study``: a generated 20-instance CT study on disk.
- ``pacslb(config_text)``: start ``python -m pacslb run``, wait for its ``ready`` line; stopped at teardown.
- ``free_port``: a free loopback TCP port factory.

Tests marked ``peers`` fail (never skip) when dcmtk or Orthanc is missing, naming tests/peers/install.sh.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import peers  # tests/integration is on sys.path (pytest's rootdir-less conftest import)
import pytest
from peers import OrthancCluster, OrthancNode, PacslbProcess, Study


@pytest.fixture(autouse=True)
def _peers_installed(request: pytest.FixtureRequest) -> None:
    """A test marked ``peers`` fails at once, with the fix, when the real peers are not installed."""
    if request.node.get_closest_marker("peers") is not None:
        peers.require_peers()


@pytest.fixture(scope="session", autouse=True)
def _no_stray_processes() -> Iterator[None]:
    """Last resort: anything a test started and did not stop is killed (by PID) at the end of the session."""
    yield
    leftovers = peers.reap_all()
    if leftovers:
        # Not an assertion (it would hide the test failure that caused it); say it loudly instead.
        print(f"\nintegration: killed processes left running by tests: {leftovers}")


@pytest.fixture
def free_port() -> Callable[[], int]:
    return peers.free_port


@pytest.fixture
def orthanc_nodes(tmp_path: Path) -> Iterator[Callable[[int], list[OrthancNode]]]:
    """A factory: ``orthanc_nodes(3)`` starts pacs1, pacs2, pacs3 and returns them, ready to serve."""
    cluster = OrthancCluster(tmp_path / "orthanc")
    yield cluster.start
    cluster.discard()


@pytest.fixture
def study(tmp_path: Path) -> Study:
    """A CT study of 20 distinct instances in one series, written to a folder."""
    return peers.make_study(tmp_path / "study", count=20)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test item, so that fixtures can tell whether the test failed."""
    report: pytest.TestReport = yield
    setattr(item, f"_report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(getattr(request.node, f"_report_{when}", None), "failed", False) for when in ("setup", "call"))


@pytest.fixture
def pacslb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], PacslbProcess]]:
    """A factory: ``pacslb(config_text)`` starts pacslb with that config and waits for its ``ready`` line.

    When the test fails, pacslb's whole log is printed (pytest shows it under "Captured stdout teardown").
    """
    started: list[PacslbProcess] = []

    def start(config_text: str) -> PacslbProcess:
        process = PacslbProcess(tmp_path / f"pacslb{len(started) + 1}", config_text)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        if process.running():
            process.send(signal.SIGTERM)
    for process in started:
        process.stop()
    if _failed(request):
        for process in started:
            print(f"----- pacslb log ({process.log_path}) -----\n{process.log()}")
