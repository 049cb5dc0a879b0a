"""Training items read one batch ahead, in a thread, while the step runs.

The training loop (:func:`speechmimic.trainer.train_loop`) names the next batch before it runs the
current one; :class:`ReadAhead` starts reading it then, so decoding overlaps the model's work (on a
GPU it would otherwise stall every step). Nothing is cached: memory holds about two batches whatever
the corpus size, and decoding a clip again costs far less than a step (about 3000 audio-seconds per
second on one CPU core). Reads must not draw random numbers: the loop's draws stay in its thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class ReadAhead(Generic[T]):
    """``reader[i]`` is ``read(i)``; ``reader.ahead(indices)`` starts reading those in the background."""

    def __init__(self, read: Callable[[int], T]):
        self._read = read
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}

    def ahead(self, indices: Iterable[int]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        for i in indices:
            if i not in self._pending:
                self._pending[i] = self._pool.submit(self._read, i)

    def __getitem__(self, i: int) -> T:
        future = self._pending.pop(i, None)
        # A read's error surfaces here, in the step that needs the item, as it would unread ahead.
        return future.result() if future is not None else self._read(i)

    def close(self) -> None:
        """Drop what was read ahead and never asked for; the reader still works, reading in place."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
