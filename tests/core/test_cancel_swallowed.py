"""A cancellation lost inside an await (Python 3.11's `wait_for` can swallow one that arrives
with the awaited answer) must not keep the service's status task, and so `voltpool run`,
running: a `TaskGroup` cancels its tasks only once."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from adapters.bootstrap import _publish_status, _raise_if_cancel_swallowed


async def _publish_swallowing_the_cancel(published: asyncio.Event) -> None:
    """A publish whose answer came with the cancellation: it returns as if not cancelled."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        published.set()


async def test_a_task_group_stops_although_a_task_swallowed_its_cancellation() -> None:
    """The group's parent is cancelled; its status-like task loses the cancellation in its
    publish, checks, and ends: the parent ends cancelled (without the check it ran on)."""
    published = asyncio.Event()

    async def status() -> None:
        while True:
            await _publish_swallowing_the_cancel(published)
            _raise_if_cancel_swallowed()
            await asyncio.sleep(10)

    async def service() -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(status())
            await asyncio.sleep(3600)

    parent = asyncio.ensure_future(service())
    await asyncio.sleep(0)  # both started and waiting
    await asyncio.sleep(0)
    parent.cancel()
    done, _ = await asyncio.wait({parent}, timeout=5.0)
    assert published.is_set()
    assert done == {parent}, "the service did not stop: its status task ran on"
    assert parent.cancelled()


class _SwallowingLink:
    """The status task's link: its publish loses a cancellation, as `wait_for` can."""

    def __init__(self) -> None:
        self.topics = SimpleNamespace(status="voltpool/status")
        self.counters: dict[str, int] = {}
        self.published = asyncio.Event()

    async def publish(self, topic: str, payload: object, *, retain: bool = False) -> None:
        await _publish_swallowing_the_cancel(self.published)


async def test_the_status_task_ends_when_its_publish_swallowed_the_cancellation() -> None:
    """`bootstrap._publish_status` itself: cancelled once while it publishes, it ends."""
    link = _SwallowingLink()
    runtime = SimpleNamespace(
        service=SimpleNamespace(
            last_plan=None,
            counters={},
            state=SimpleNamespace(vehicles={}),
            store_down_since=None,
        ),
        link=link,
        settings=SimpleNamespace(site="home"),
        central=SimpleNamespace(online=lambda: []),
        dispatcher=SimpleNamespace(not_following=set()),
        solver=None,
    )
    task = asyncio.ensure_future(_publish_status(runtime))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # in its publish
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert link.published.is_set()
    assert done == {task}, "the status task ran on after its cancellation"
    assert task.cancelled()


async def test_an_uncancelled_task_goes_on() -> None:
    """Not cancelled: the check does nothing."""

    async def once() -> str:
        await asyncio.sleep(0)
        _raise_if_cancel_swallowed()
        return "went on"

    assert await once() == "went on"
