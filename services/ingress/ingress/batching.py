"""Group commit on the request path: concurrent requests share one database round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Pass submitted items to `flush` in batches, at most `concurrency` batches at once.

    An item that finds a free slot is flushed at once, alone, so an idle
    service adds no delay. Under load every slot is busy, items wait for the
    next free slot, and that slot takes up to `max_batch` of them: batches
    grow with the load and no timer is involved.

    `flush` returns one result per item, in order. When a batch of several
    items fails with one of `isolate`, each item is flushed again alone, so
    one item that the database rejects fails only its own request.
    """

    def __init__(
        self,
        flush: Callable[[list[Item]], Awaitable[list[Result]]],
        *,
        concurrency: int,
        max_batch: int,
        isolate: tuple[type[Exception], ...] = (),
    ) -> None:
        self._flush = flush
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.isolate = isolate
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._start_batches()
        return await future

    def _start_batches(self) -> None:
        while self._waiting and self._running < self.concurrency:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            self._running += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except self.isolate as exc:
            if len(batch) == 1:
                _fail(batch, exc)
            else:
                for item, future in batch:
                    await self._run_alone(item, future)
        except Exception as exc:
            _fail(batch, exc)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._running -= 1
            self._start_batches()

    async def _run_alone(self, item: Item, future: asyncio.Future[Result]) -> None:
        try:
            [result] = await self._flush([item])
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)


def _fail(batch: list[tuple[Item, asyncio.Future[Result]]], exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
