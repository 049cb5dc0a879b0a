"""The store of paid queries: the only code that writes target outputs.

Layout of a ledger directory::

    ledger.json          header: the target spec, its frame rate, layers and padding policy
    index.jsonl          append-only event log (one JSON object per line, fsynced)
    blobs/ab/<key>.safetensors   one response per clip, written atomically

A clip is keyed by the SHA-256 of its 16 kHz float32 samples, so the same audio is never paid twice,
whatever its file name. Crash safety rests on three rules:

1. Before a batch is sent, a ``send`` event naming its keys is appended and fsynced.
2. Each response is written to a temporary file, fsynced and renamed into ``blobs/`` (atomic), and
   only then is its ``paid`` event appended.
3. On open, a torn last line of the index is cut off, and a blob whose ``paid`` event was lost is
   re-indexed from its own metadata.

A SIGKILL therefore loses at most the responses still in flight; those keys are *in doubt* (sent,
no answer on disk). They are sent again on resume with the same idempotency keys (targets that
accept ``keys=`` forward them, e.g. as an HTTP ``Idempotency-Key``), so an API that honours them
does not charge twice; targets that run locally cost nothing to ask again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from speechmimic.audio import SAMPLE_RATE, AudioError
from speechmimic.budget import Budget, take_within
from speechmimic.corpus import Clip
from speechmimic.targets.base import Target


class BudgetExhausted(RuntimeError):
    """A run needed answers its ledger refused to pay for: they would exceed the budget."""


def content_key(wav: np.ndarray) -> str:
    """The key of a clip: SHA-256 of its 16 kHz mono float32 samples."""
    return hashlib.sha256(np.ascontiguousarray(wav, dtype=np.float32).tobytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Entry:
    """One paid response: which clip, how long it was, and how many frames each layer returned."""

    key: str
    clip_id: str
    num_samples: int
    frames: dict[str, int]

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE


class Ledger:
    """Append-only, crash-safe store of the responses a target returned.

    ``budget`` caps what may be paid in total over the ledger's lifetime (already paid responses
    count); the default caps nothing.
    """

    def __init__(self, root: str | os.PathLike, budget: Budget | None = None):
        self.root = Path(root)
        self.budget = budget or Budget()
        self.entries: dict[str, Entry] = {}
        self.aliases: dict[str, str] = {}  # clip id -> key, for every clip id seen
        self.in_doubt: set[str] = set()
        self.header: dict | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)
        header = self.root / "ledger.json"
        if header.exists():
            self.header = json.loads(header.read_text())
        self._recover()

    # -- reading -----------------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / "index.jsonl"

    def _blob_path(self, key: str) -> Path:
        return self.root / "blobs" / key[:2] / f"{key}.safetensors"

    def _recover(self) -> None:
        sent: set[str] = set()
        if self.index_path.exists():
            raw = self.index_path.read_bytes()
            good = raw.rfind(b"\n") + 1
            if good < len(raw):  # a torn last line from a crash mid-append: drop it
                with open(self.index_path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
            for line in raw[:good].splitlines():
                event = json.loads(line)
                if event["event"] == "send":
                    sent.update(event["keys"])
                elif event["event"] == "paid":
                    self._add(Entry(event["key"], event["clip_id"], event["num_samples"], event["frames"]))
                elif event["event"] == "alias":
                    self.aliases[event["clip_id"]] = event["key"]
        # A blob renamed into place whose "paid" line never made it: the response is safe, index it.
        for blob in sorted((self.root / "blobs").glob("*/*.safetensors")):
            key = blob.stem
            if key not in self.entries:
                meta = _read_metadata(blob)
                entry = Entry(key, meta["clip_id"], int(meta["num_samples"]), json.loads(meta["frames"]))
                self._append({"event": "paid", **_entry_json(entry)})
                self._add(entry)
        self.in_doubt = sent - set(self.entries)

    def _add(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        self.aliases.setdefault(entry.clip_id, entry.key)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def key_of(self, clip_id: str) -> str | None:
        return self.aliases.get(clip_id)

    def get(self, key: str) -> dict[str, np.ndarray]:
        """The response paid for ``key``: ``{layer: frames (T, D)}``."""
        return load_file(self._blob_path(key))

    def get_clip(self, clip_id: str) -> dict[str, np.ndarray]:
        key = self.key_of(clip_id)
        if key is None or key not in self.entries:
            raise KeyError(f"clip {clip_id!r} has no paid response in {self.root}")
        return self.get(key)

    @property
    def spent_clips(self) -> int:
        return len(self.entries)

    @property
    def spent_seconds(self) -> float:
        return sum(e.seconds for e in self.entries.values())

    def summary(self) -> dict:
        return {
            "target": (self.header or {}).get("target"),
            "paid_clips": self.spent_clips,
            "paid_seconds": round(self.spent_seconds, 3),
            "in_doubt": len(self.in_doubt),
            "budget_clips": self.budget.clips,
            "budget_seconds": self.budget.seconds,
        }

    def layer_stats(self, keys: Iterable[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per-layer mean and std of the returned frames over ``keys`` (default: all paid)."""
        sums: dict[str, np.ndarray] = {}
        sqs: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for key in keys if keys is not None else self.entries:
            for name, frames in self.get(key).items():
                f = frames.astype(np.float64)
                sums[name] = sums.get(name, 0) + f.sum(0)
                sqs[name] = sqs.get(name, 0) + (f**2).sum(0)
                counts[name] = counts.get(name, 0) + len(f)
        stats = {}
        for name in sums:
            mean = sums[name] / counts[name]
            var = np.maximum(sqs[name] / counts[name] - mean**2, 0.0)
            stats[name] = (mean.astype(np.float32), np.sqrt(var).astype(np.float32))
        return stats

    # -- writing -----------------------------------------------------------------------------------
    def _append(self, event: dict) -> None:
        line = (json.dumps(event, sort_keys=True) + "\n").encode()
        fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write() per event: a crash leaves at most one torn last line
            os.fsync(fd)
        finally:
            os.close(fd)

    def bind(self, target: Target) -> None:
        """Record which target this ledger pays; refuse to mix responses of two targets."""
        header = {
            "target": target.spec,
            "frame_rate": target.frame_rate,
            "layers": list(target.layers),
            "padding": target.padding,
            "sample_rate": SAMPLE_RATE,
        }
        if self.header is None:
            tmp = self.root / "ledger.json.tmp"
            tmp.write_text(json.dumps(header, indent=2))
            os.replace(tmp, self.root / "ledger.json")
            _fsync_dir(self.root)
            self.header = header
        elif self.header["target"] != header["target"] or self.header["layers"] != header["layers"]:
            raise ValueError(
                f"ledger {self.root} holds responses of {self.header['target']} (layers "
                f"{self.header['layers']}), not {header['target']} (layers {header['layers']})"
            )

    def _store(self, key: str, clip_id: str, wav: np.ndarray, response: dict[str, np.ndarray]) -> Entry:
        entry = Entry(key, clip_id, int(len(wav)), {k: int(v.shape[0]) for k, v in response.items()})
        path = self._blob_path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        meta = {"clip_id": clip_id, "num_samples": str(entry.num_samples), "frames": json.dumps(entry.frames)}
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in response.items()}, tmp, meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        self._append({"event": "paid", **_entry_json(entry)})
        self._add(entry)
        return entry

    def _would_exceed(self, extra_clips: int, extra_seconds: float) -> bool:
        return not self.budget.allows(self.spent_clips + extra_clips, self.spent_seconds + extra_seconds)

    def query(
        self,
        target: Target,
        clips: Iterable[tuple[str, Callable[[], np.ndarray]]],
        batch_size: int = 8,
        progress: bool = True,
        total: int | None = None,
    ) -> dict:
        """Pay for the responses of ``clips`` (pairs of clip id and a loader of its waveform).

        Clips already paid (by id or by content) cost nothing; a clip that would exceed the budget is
        skipped and counted as ``over_budget``; a clip whose loader raises :class:`AudioError` is
        listed in ``unusable`` with the reason. Returns what was paid, reused and skipped.
        """
        self.bind(target)
        takes_keys = "keys" in inspect.signature(target.__call__).parameters
        paid = reused = over_budget = 0
        unusable: list[tuple[str, str]] = []
        batch: list[tuple[str, str, np.ndarray]] = []
        pending: set[str] = set()
        bar = tqdm(total=total, desc="query", unit="clip", disable=not progress)

        def flush() -> None:
            nonlocal paid
            if not batch:
                return
            keys = [k for _, k, _ in batch]
            self._append({"event": "send", "keys": keys, "time": time.time()})
            wavs = [w for _, _, w in batch]
            try:
                responses = target(wavs, keys=keys) if takes_keys else target(wavs)
            except BaseException:
                self.in_doubt |= set(keys)  # sent, no answer on disk
                raise
            for (clip_id, key, wav), response in zip(batch, responses, strict=True):
                self._store(key, clip_id, wav, response)
                paid += 1
            self.in_doubt -= set(keys)
            batch.clear()
            pending.clear()

        for clip_id, load in clips:
            bar.update(1)
            known = self.aliases.get(clip_id)
            if known is not None and known in self.entries:
                reused += 1
                continue
            try:
                wav = load()
            except AudioError as e:  # a bad clip is reported, never sent, and stops nothing
                unusable.append((clip_id, e.reason))
                continue
            key = content_key(wav)
            if key in self.entries or key in pending:
                self._append({"event": "alias", "clip_id": clip_id, "key": key})
                self.aliases[clip_id] = key
                reused += 1
                continue
            pending_seconds = sum(len(w) for _, _, w in batch) / SAMPLE_RATE
            if self._would_exceed(len(batch) + 1, pending_seconds + len(wav) / SAMPLE_RATE):
                over_budget += 1
                continue
            batch.append((clip_id, key, wav))
            pending.add(key)
            if len(batch) >= batch_size:
                flush()
        flush()
        bar.close()
        return {
            "paid": paid,
            "reused": reused,
            "over_budget": over_budget,
            "unusable": unusable,
            **self.summary(),
        }

    def keys(self) -> Iterator[str]:
        return iter(self.entries)


def query_clips(
    target: Target,
    clips: list[Clip],
    ledger: Ledger,
    batch_size: int = 8,
    progress: bool = True,
    budget: Budget | None = None,
) -> dict:
    """Pay for the target's answers to ``clips`` (already paid ones are reused).

    ``budget`` caps this request, reused answers included: walking ``clips`` in order, a clip that
    no longer fits (:func:`~speechmimic.budget.take_within`, the rule selection applies) is refused,
    never sent, and counted in ``over_budget``. A selection made within the same budget always fits.
    """
    refused = 0
    if budget is not None:
        fits = take_within(clips, range(len(clips)), budget)
        refused = len(clips) - len(fits)
        clips = [clips[i] for i in fits]
    loader = ((c.id, lambda c=c: c.load(min_samples=target.min_samples)) for c in clips)
    stats = ledger.query(target, loader, batch_size=batch_size, progress=progress, total=len(clips))
    return {**stats, "over_budget": stats["over_budget"] + refused}


def _entry_json(entry: Entry) -> dict:
    return {
        "key": entry.key,
        "clip_id": entry.clip_id,
        "num_samples": entry.num_samples,
        "frames": entry.frames,
    }


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return dict(f.metadata() or {})
