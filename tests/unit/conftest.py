"""Shared fixtures of the unit tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _pacslb_logs_reach_caplog() -> Iterator[None]:
    """pacslb's logging setup (which in-process integration tests run) stops its logger from propagating,
    so that lines are not printed twice; pytest's log capture listens at the root, so let them through."""
    root = logging.getLogger("pacslb")
    saved = root.propagate
    root.propagate = True
    yield
    root.propagate = saved
