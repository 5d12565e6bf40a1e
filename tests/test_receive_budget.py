"""ReceiveBudget: the shared bound on bytes held in partially received large frames."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sentinel_ipc.server.receive_budget import ReceiveBudget


async def test_takes_what_fits_at_once_and_the_rest_waits_in_order() -> None:
    budget = ReceiveBudget(100)
    await budget.take(60)
    order: list[str] = []

    async def taker(name: str, amount: int) -> None:
        await budget.take(amount)
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker, "big", 90)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(taker, "small", 10)  # would fit now, but queues behind "big"
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and budget.waiting == 2 and budget.used == 60
        budget.give(30)  # "small" would fit, "big" not yet: nobody overtakes "big"
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and budget.waiting == 2 and budget.used == 30
        budget.give(30)
        await trio.testing.wait_all_tasks_blocked()
        # Both granted in one go ("big" first); trio may wake them in either order.
        assert sorted(order) == ["big", "small"] and budget.used == 100
        assert budget.waiting == 0


async def test_a_cancelled_wait_reserves_nothing_and_lets_the_next_through() -> None:
    budget = ReceiveBudget(100)
    await budget.take(80)
    got: list[int] = []

    async def taker(amount: int) -> None:
        await budget.take(amount)
        got.append(amount)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker, 50)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(taker, 20)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and budget.waiting == 2
        nursery.cancel_scope.cancel()  # both waiters are cancelled: nothing leaks
    assert budget.used == 80 and budget.waiting == 0
    budget.give(80)
    assert budget.used == 0


async def test_cancelling_the_head_waiter_lets_a_smaller_one_behind_it_in() -> None:
    budget = ReceiveBudget(100)
    await budget.take(50)
    got: list[int] = []

    async def taker(amount: int, scope_box: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_box.append(scope)
            await budget.take(amount)
            got.append(amount)

    head: list[trio.CancelScope] = []
    tail: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker, 80, head)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(taker, 30, tail)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        head[0].cancel()  # the frame's read deadline
        await trio.testing.wait_all_tasks_blocked()
        assert got == [30] and budget.used == 80


async def test_more_than_the_whole_budget_is_refused_at_once() -> None:
    budget = ReceiveBudget(100)
    with pytest.raises(ValueError, match="can never fit"):
        await budget.take(101)
    assert budget.used == 0
    with pytest.raises(ValueError):
        ReceiveBudget(0)
