"""Checks for the whole test session."""

from __future__ import annotations

import pytest

from pacslb import compiled


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a compiled module older than its source: it would test the code before the edit."""
    old = [] if compiled.running_sources() else compiled.stale()
    if old:
        pytest.exit(
            f"compiled modules older than their sources: {', '.join(old)}; run `make compile` "
            "(or `python -m pacslb.compiled clean` to test the sources as Python)",
            returncode=2,
        )
