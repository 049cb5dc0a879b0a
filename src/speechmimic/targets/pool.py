"""A local target asked by several processes at once: ``PooledTarget(spec, workers=N)``.

Each worker process loads the target from its spec once; a batch's clips are dealt out to the
workers in contiguous shares and the answers come back in order. It is the same target to the
ledger (its ``spec`` is the inner one's), so one ledger, one writer and its crash guarantees stay as
they are, and a clip is still paid once: parallel querying without shards to merge. A target that
answers each clip alone (``padding=per_clip``) gives the same answers as in one process; one that
batches clips (``bucket``) forms other batches, which may round its outputs differently.

An error in one worker's share fails only its clips: they come back as
:class:`~speechmimic.targets.base.PartialAnswers`, so the ledger keeps every answer that came.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from speechmimic.errors import InputError
from speechmimic.targets.base import PartialAnswers, TargetError

_TARGET = None  # the worker process's own target


def _load(spec: str, device: str, threads: int) -> None:
    global _TARGET
    import torch

    from speechmimic.targets.registry import load_backend

    torch.set_num_threads(threads)
    _TARGET = load_backend(spec, device=device)


def _describe() -> dict:
    return {
        k: getattr(_TARGET, k, None)
        for k in ("spec", "frame_rate", "layers", "padding", "min_samples", "max_samples")
    }


def _ask(wavs: list[np.ndarray], keys: list[str] | None):
    """A share's answers, the errors of those it could not answer, or the error of the whole share
    (PartialAnswers itself does not pickle: its parts do)."""
    try:
        return "ok", _TARGET(wavs, keys=keys) if keys is not None else _TARGET(wavs)
    except PartialAnswers as e:
        return "partial", (e.answers, e.errors)
    except TargetError as e:
        return "failed", e


class PooledTarget:
    """``spec`` answered by ``workers`` processes (``threads`` torch threads each)."""

    def __init__(self, spec: str, workers: int, device: str = "cpu", threads: int = 1):
        if workers < 1:
            raise InputError(f"workers must be at least 1, not {workers}")
        context = multiprocessing.get_context("spawn")  # torch's threads do not survive a fork
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_load, initargs=(spec, device, threads)
        )
        info = self._pool.submit(_describe).result()
        self.spec = info["spec"]
        self.frame_rate = info["frame_rate"]
        self.layers = info["layers"]
        self.padding = info["padding"]
        self.min_samples = info["min_samples"]
        self.max_samples = info["max_samples"]

    def __call__(self, wavs: list[np.ndarray], keys: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        n = len(wavs)
        bounds = [(n * i // self.workers, n * (i + 1) // self.workers) for i in range(self.workers)]
        bounds = [(a, b) for a, b in bounds if b > a]
        futures = [self._pool.submit(_ask, wavs[a:b], keys[a:b] if keys else None) for a, b in bounds]
        answers: list[dict[str, np.ndarray] | None] = [None] * n
        errors: dict[int, TargetError] = {}
        for (a, b), future in zip(bounds, futures, strict=True):
            status, value = future.result()
            if status == "ok":
                answers[a:b] = value
            elif status == "partial":
                part, failed = value
                answers[a:b] = part
                errors.update({a + i: error for i, error in failed.items()})
            else:
                errors.update({i: value for i in range(a, b)})
        if errors:
            raise PartialAnswers(answers, errors)
        return answers  # type: ignore[return-value]

    def close(self) -> None:
        self._pool.shutdown()
