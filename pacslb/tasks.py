"""Stopping background tasks without losing the caller's own cancellation."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any], timeout: float | None = None) -> bool:
    """Cancel ``task`` and wait until it ends, at most ``timeout`` seconds; whether it ended.

    The usual ``task.cancel()`` then ``await task`` under ``suppress(CancelledError)`` cannot tell the task's
    cancellation from one of the caller itself arriving during the wait (a shutdown, an enclosing
    ``asyncio.timeout``), and swallows both. ``asyncio.wait`` never raises the task's CancelledError, so the
    caller's own still reaches it.

    Raises:
        Exception: the one the task ended with, if it ended with one rather than by the cancellation.
    """
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        return False
    if not task.cancelled() and (exc := task.exception()) is not None:
        raise exc
    return True
