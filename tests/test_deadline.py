"""The shared total-deadline timer (lucid.deadline), on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from lucid.deadline import Deadlines


async def test_a_deadline_that_passes_raises_timeout_error():
    deadlines = Deadlines()
    deadline = deadlines.deadline(0.05)
    with pytest.raises(TimeoutError):
        with deadline:
            await asyncio.sleep(10)
    assert deadline.expired
    assert len(deadlines) == 0
    assert asyncio.current_task().cancelling() == 0  # our cancellation was taken back


async def test_a_deadline_not_reached_changes_nothing_and_close_forgets_it():
    deadlines = Deadlines()
    deadline = deadlines.deadline(5)
    with deadline:
        await asyncio.sleep(0)
    with deadline:  # armed again: the response body after the request
        await asyncio.sleep(0)
    assert not deadline.expired and len(deadlines) == 1
    deadline.close()
    assert len(deadlines) == 0


async def test_long_timeouts_round_up_to_the_second_and_share_one_timer():
    deadlines = Deadlines(coarse_from=5.0)
    first, second = deadlines.deadline(30), deadlines.deadline(30)
    short = deadlines.deadline(0.5)
    assert first.when == int(first.when)
    assert short.when != int(short.when)  # a short timeout keeps its exact time
    assert len(deadlines._due) == 2 and len(deadlines) == 3  # two timers for three
    for deadline in (first, second, short):
        deadline.close()
    assert len(deadlines) == 0


async def test_coarse_deadlines_expire_together():
    deadlines = Deadlines(coarse_from=0.0)  # every deadline rounds up to the second
    results: list[str] = []

    async def call(name: str) -> None:
        try:
            with deadlines.deadline(0.01):
                await asyncio.sleep(10)
        except TimeoutError:
            results.append(name)

    await asyncio.wait_for(asyncio.gather(call("a"), call("b")), timeout=5)
    assert sorted(results) == ["a", "b"]
    assert len(deadlines) == 0


async def test_a_deadline_passed_while_not_armed_refuses_the_next_block():
    deadlines = Deadlines()
    deadline = deadlines.deadline(0.01)
    with deadline:
        pass
    await asyncio.sleep(0.05)  # passes between the request and the response body
    assert deadline.expired
    with pytest.raises(TimeoutError):
        with deadline:
            await asyncio.sleep(10)
    assert asyncio.current_task().cancelling() == 0  # nothing was cancelled


async def test_an_outside_cancellation_at_the_same_time_wins_over_the_deadline():
    deadlines = Deadlines()
    entered = asyncio.Event()

    async def call() -> None:
        with deadlines.deadline(10):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(call())
    await entered.wait()
    for deadline in list(deadlines._due.values())[0]:
        deadline.expire()  # the deadline passes and, before the task runs again,
    task.cancel()          # somebody else cancels it too: that cancellation is not ours
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelling_the_task_is_not_mistaken_for_the_deadline():
    deadlines = Deadlines()
    entered = asyncio.Event()

    async def call() -> None:
        deadline = deadlines.deadline(10)
        try:
            with deadline:
                entered.set()
                await asyncio.sleep(10)
        finally:
            deadline.close()

    task = asyncio.create_task(call())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0
