"""Dynamic batching: requests that arrive together share one call of the target.

The speech analogue of max-batch-tokens: a batch closes when its audio would pass
``max_batch_seconds`` or when its first request has waited ``max_delay`` seconds. The target is
called from one worker thread (models are not assumed thread-safe), and applies its own padding
policy to the batch, so a ``per_clip`` target answers every clip exactly as it would alone. While the
model runs, new requests queue up and form the next batch. If a batch fails, each of its clips is
tried alone, so one clip the model cannot take fails only its own request.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from speechmimic.audio import SAMPLE_RATE
from speechmimic.serve.metrics import Metrics
from speechmimic.targets import Target


class Busy(Exception):
    """The queue is full: the client should come back shortly."""


class Batcher:
    def __init__(
        self, target: Target, metrics: Metrics, max_batch_seconds: float, max_delay: float, max_queue: int
    ):
        self.target = target
        self.metrics = metrics
        self.max_samples = max_batch_seconds * SAMPLE_RATE
        self.max_delay = max_delay
        self.max_queue = max_queue
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._worker.shutdown(wait=True)

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
            first = held if held is not None else await self._queue.get()
            held = None
            batch, samples = [first], len(first[0])
            deadline = loop.time() + self.max_delay
            while True:
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
            wavs = [w for w, _ in batch]
            results = await loop.run_in_executor(self._worker, self._answer, wavs)
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
