"""cancel_and_wait: stopping a background task without swallowing the caller's own cancellation."""

from __future__ import annotations

import asyncio

import pytest

from pacslb.tasks import cancel_and_wait


def test_the_callers_own_cancellation_during_the_wait_goes_through() -> None:
    async def scenario() -> tuple[bool, bool]:
        background = asyncio.create_task(asyncio.sleep(3600))
        await asyncio.sleep(0)

        async def stopper() -> str:
            await cancel_and_wait(background)
            return "carried on"  # what a swallowed cancellation would let it do

        caller = asyncio.create_task(stopper())
        await asyncio.sleep(0)  # the caller is waiting for the background task to end
        caller.cancel()
        await asyncio.wait([caller], timeout=2)
        return caller.cancelled(), background.cancelled()

    assert asyncio.run(scenario()) == (True, True)


def test_a_task_that_failed_raises_and_one_that_will_not_end_is_reported() -> None:
    async def scenario() -> bool:
        async def fails() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise RuntimeError("broken on the way out") from None

        failing = asyncio.create_task(fails())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="broken on the way out"):
            await cancel_and_wait(failing)

        release = asyncio.get_running_loop().create_future()

        async def stubborn() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await release  # carries on instead of ending

        holdout = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        ended = await cancel_and_wait(holdout, timeout=0.1)
        release.set_result(None)
        await asyncio.wait([holdout], timeout=2)
        return ended

    assert asyncio.run(scenario()) is False
