"""Dynamic batching: concurrent requests are gathered up to a batch size or a queue delay, run as one forward
pass in a model thread, and answered separately. Several model instances (Triton's instance group) each gather and
run their own batch, at the same time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("convnets")


@dataclass
class _Pending:
    batch: np.ndarray
    future: asyncio.Future
    enqueued: float


class DynamicBatcher:
    """``await batcher.submit(x)`` returns ``run(x)`` for an N-row float32 batch ``x``, computed together with other
    requests that arrived within ``max_delay_s`` of the first, up to ``max_batch_size`` rows. A request larger than
    ``max_batch_size`` is never split: it runs alone.

    ``instances``: model threads, each gathering its batch while the others compute theirs (``run`` must allow
    concurrent calls: a PyTorch module in inference mode and an ONNX Runtime session do)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_delay_s: float,
                 on_batch: Callable[[int, list[float]], None] | None = None, instances: int = 1):  # fmt: skip
        self.run, self.max_batch_size, self.max_delay_s = run, max_batch_size, max_delay_s
        self.on_batch = on_batch or (lambda size, queue_times: None)
        # A deque and an event rather than asyncio.Queue: waiting on the event with a timeout can never lose an item.
        self.pending: deque[_Pending] = deque()
        self.arrived = asyncio.Event()
        # Each instance's thread runs its batches one after another; the event loop stays free meanwhile.
        self.instances = instances
        self.executor = concurrent.futures.ThreadPoolExecutor(instances, thread_name_prefix="model")
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._loop()) for _ in range(self.instances)]

    async def stop(self) -> None:
        """Answer everything already queued, then stop (the server calls this after its last request finished)."""
        while self.pending:
            await asyncio.sleep(0.01)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, batch: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(batch, future, time.perf_counter()))
        self.arrived.set()
        return await future

    async def _wait(self, timeout: float | None) -> bool:
        self.arrived.clear()
        if self.pending:
            return True
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _gather(self) -> list[_Pending]:
        while not self.pending:
            await self._wait(None)
        first = self.pending.popleft()
        group, rows = [first], len(first.batch)
        deadline = time.perf_counter() + self.max_delay_s
        while rows < self.max_batch_size:
            if not self.pending:
                if not await self._wait(deadline - time.perf_counter()):
                    break
                continue  # another instance may have taken what arrived
            if rows + len(self.pending[0].batch) > self.max_batch_size:
                break  # it opens the next batch: order is kept
            item = self.pending.popleft()
            group.append(item)
            rows += len(item.batch)
        return group

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = await self._gather()
            group = [p for p in group if not p.future.cancelled()]  # the client went away
            if not group:
                continue
            started = time.perf_counter()
            batch = group[0].batch if len(group) == 1 else np.concatenate([p.batch for p in group])
            try:
                probs = await loop.run_in_executor(self.executor, self.run, batch)
            except Exception as e:  # noqa: BLE001 - fail these requests, keep the server alive
                log.exception("model failed on a batch of %d", len(batch))
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            self.on_batch(len(batch), [started - p.enqueued for p in group])
            offset = 0
            for p in group:
                n = len(p.batch)
                if not p.future.done():
                    p.future.set_result(probs[offset : offset + n])
                offset += n
