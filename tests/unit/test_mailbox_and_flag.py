"""The two small primitives the WebSocket server keeps per connection instead of asyncio's."""

from __future__ import annotations

import asyncio

import pytest

from streams.mailbox import Mailbox
from streams.wsserver import Flag


async def test_a_mailbox_hands_items_over_in_order_to_its_waiting_consumer() -> None:
    box: Mailbox[int] = Mailbox()
    assert box.empty() and box.qsize() == 0
    taken = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)
    assert not taken.done()  # nothing yet: it waits
    box.put_nowait(1)
    box.put_nowait(2)
    assert await asyncio.wait_for(taken, 5) == 1
    assert box.qsize() == 1 and box.get_nowait() == 2 and box.empty()


async def test_a_consumer_cancelled_while_waiting_leaves_the_mailbox_usable() -> None:
    box: Mailbox[str] = Mailbox()
    waiting = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    box.put_nowait("after")
    assert await asyncio.wait_for(box.get(), 5) == "after"


async def test_a_flag_holds_its_waiters_while_clear_and_frees_them_all_when_set() -> None:
    flag = Flag()
    assert flag.is_set()
    await asyncio.wait_for(flag.wait(), 5)  # set: no waiting
    flag.clear()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(3)]
    cancelled = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)
    assert not any(w.done() for w in [*waiters, cancelled])
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    flag.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert flag._waiters == []  # none left behind, the cancelled one included
