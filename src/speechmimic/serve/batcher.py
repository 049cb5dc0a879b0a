"""Dynamic batching: requests that arrive together share one call of the target.

The speech analogue of max-batch-tokens: a batch closes when its audio would pass
``max_batch_seconds`` or when its first request has waited ``max_delay`` seconds. The target is
called from ``workers`` threads (one by default: models are not assumed thread-safe) and applies its
own padding policy to the batch, so a ``per_clip`` target answers every clip exactly as it would
alone. While the model runs, new requests queue up and form the next batch. If a batch fails, each
of its clips is tried alone, so one clip the model cannot take fails only its own request.

Several workers, each with one torch thread, use several cores on batches side by side; where the
cores are shared with other processes this beats one forward spread over several torch threads,
which wait for each other at every operation (every LSTM step, every layer).
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from speechmimic.audio import SAMPLE_RATE
from speechmimic.serve.metrics import Metrics
from speechmimic.targets import Target


class Busy(Exception):
    """The queue is full: the client should come back shortly."""


class Batcher:
    def __init__(
        self,
        target: Target,
        metrics: Metrics,
        max_batch_seconds: float,
        max_delay: float,
        max_queue: int,
        workers: int = 1,
    ):
        self.target = target
        self.metrics = metrics
        self.max_samples = max_batch_seconds * SAMPLE_RATE
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.workers = workers
        self._queue: asyncio.Queue | None = None
        self._free: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._free = asyncio.Semaphore(self.workers)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        for task in (self._task, *self._running):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._pool.shutdown(wait=True)

    async def embed(self, wav: np.ndarray) -> dict[str, np.ndarray]:
        """The target's answer to one clip, computed in a batch with whatever else is waiting."""
        if self._queue.qsize() >= self.max_queue:
            raise Busy(f"{self._queue.qsize()} requests are waiting for the model")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((wav, future))
        self.metrics.queue.set(self._queue.qsize())
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        held = None  # a request that did not fit the last batch opens the next
        while True:
            await self._free.acquire()  # a batch forms once a worker can take it
            first = held if held is not None else await self._queue.get()
            held = None
            batch, samples = [first], len(first[0])
            # with several workers a batch takes only its share of what waits, so none sits idle
            share = math.ceil((1 + self._queue.qsize()) / self.workers) if self.workers > 1 else math.inf
            deadline = loop.time() + self.max_delay
            while len(batch) < share:
                if self._queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                else:
                    item = self._queue.get_nowait()
                if samples + len(item[0]) > self.max_samples:
                    held = item
                    break
                batch.append(item)
                samples += len(item[0])
            self.metrics.queue.set(self._queue.qsize())
            self.metrics.batch_clips.observe(len(batch))
            self.metrics.batch_seconds.observe(samples / SAMPLE_RATE)
            task = asyncio.create_task(self._dispatch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _dispatch(self, batch: list) -> None:
        try:
            wavs = [w for w, _ in batch]
            results = await asyncio.get_running_loop().run_in_executor(self._pool, self._answer, wavs)
        finally:
            self._free.release()
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its client went away
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _answer(self, wavs: list[np.ndarray]) -> list:
        try:
            return list(self.target(wavs))
        except Exception as e:
            if len(wavs) == 1:
                return [e]
        out = []
        for wav in wavs:
            try:
                out.append(self.target([wav])[0])
            except Exception as e:
                out.append(e)
        return out
