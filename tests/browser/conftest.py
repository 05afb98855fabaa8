"""Fixtures for the dashboard tests: Debian's Chromium driven by Playwright, and the real peers of the
integration tests (their helpers are in tests/integration/peers.py).

- ``page``: a fresh Chromium page (1400x1000); the browser is launched once per module, never downloaded:
  Playwright is given /usr/bin/chromium, which tests/browser/install.sh installs.
- ``orthanc_nodes(n)`` and ``pacslb(config_text)``: as in tests/integration, stopped at teardown.

A missing Chromium or Orthanc fails the test (never skips it), naming the script that installs it.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import peers
from peers import OrthancCluster, OrthancNode, PacslbProcess

CHROMIUM = Path("/usr/bin/chromium")
#: As peers.md prescribes for a root user on these machines: no sandbox, no GPU, nothing phoning home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run tests/browser/install.sh as root", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[attr-defined]
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="session", autouse=True)
def _no_stray_processes() -> Iterator[None]:
    yield
    leftovers = peers.reap_all()
    if leftovers:
        print(f"\nbrowser: killed processes left running by tests: {leftovers}")


@pytest.fixture
def orthanc_nodes(tmp_path: Path) -> Iterator[Callable[[int], list[OrthancNode]]]:
    cluster = OrthancCluster(tmp_path / "orthanc")
    yield cluster.start
    cluster.stop_all()


@pytest.fixture
def pacslb(tmp_path: Path) -> Iterator[Callable[[str], PacslbProcess]]:
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
