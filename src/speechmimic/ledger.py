"""The store of paid queries: the only code that writes target outputs.

Layout of a ledger directory::

    ledger.json          header: the target spec, its frame rate, layers and padding policy
    index.jsonl          append-only event log (one JSON object per line, fsynced)
    blobs/ab/<key>.safetensors   one response per clip, written atomically
    writer.lock          held (flock) by the one process writing; says who it is
    damaged/             answers dropped because their bytes no longer match their digest

A clip is keyed by the SHA-256 of its 16 kHz float32 samples, so the same audio is never paid twice,
whatever its file name. Crash safety rests on three rules:

1. Before a batch is sent, a ``send`` event naming its keys is appended and fsynced.
2. Each response is written to a temporary file (named for its writer), fsynced and renamed into
   ``blobs/`` (atomic), and only then is its ``paid`` event appended, with the digest of its arrays.
3. A torn last line of the index is cut off, and a blob whose ``paid`` event was lost is re-indexed
   from its own metadata (once its digest checks out), by whoever next holds the writer lock.

A SIGKILL therefore loses at most the responses still in flight; those keys are *in doubt* (sent,
no answer on disk). They are sent again on resume with the same idempotency keys (targets that
accept ``keys=`` forward them, e.g. as an HTTP ``Idempotency-Key``), so an API that honours them
does not charge twice; targets that run locally cost nothing to ask again.

**Answers in part.** A target that answers some clips of a batch and not others raises
:class:`~speechmimic.targets.base.PartialAnswers`: the answers that came are stored first (they may
have been charged), a clip the target refuses for itself (:class:`ClipRefused`: too long, too short,
undecodable) gets a ``refused`` event and is listed as unusable, and any other error then ends the run.
A target that does not say what it returns (a remote API hiding it) has its layers recorded from the
first answer; every later answer must return the same layers.

**One writer at a time.** Every write (a query, binding a target, a repair, a drop) happens under an
exclusive ``flock`` on ``writer.lock``, which the OS releases when its holder exits or is killed. A
second writer *waits* for it, saying who holds it, then reads what the first one paid before it
pays anything itself: two ``speechmimic query`` runs on one ledger never pay a clip twice. Readers
(distill, fidelity) take no lock: answers appear only by rename and index lines are read only when
complete, so a reader never sees half an answer. The lock is an OS file lock: keep ledgers on a local
filesystem (NFS may not honour it).

**Checksums.** Every ``paid`` event records the SHA-256 of the answer's arrays; :meth:`Ledger.get`
verifies it, and a mismatch (bit rot, a partial copy) raises :class:`DamagedAnswerError` naming the
clip. :meth:`Ledger.verify` checks a whole ledger; :meth:`Ledger.drop` moves damaged answers aside so
the next query buys them again (``speechmimic query --repair``, ``speechmimic ledger verify --drop``).

**Storage.** Answers are stored as float16 by default (``store="float32"`` keeps them whole):
half the disk and half the memory of a training cache, for a rounding error (relative 2^-11) far
below what a student's prediction error is; an answer holding a value beyond float16's range
(|x| > 65504) is kept in float32. The header records the choice, once, for the ledger's life;
:meth:`Ledger.get` returns float32 either way unless asked for the stored type.

**Accounting.** What a ledger has spent is the sum of its ``paid`` events: an answer dropped and
bought again counts twice, because it may have been charged twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from speechmimic.audio import SAMPLE_RATE, AudioError
from speechmimic.budget import Budget, take_within
from speechmimic.corpus import Clip
from speechmimic.errors import InputError, NotFound, SpeechmimicError
from speechmimic.targets.base import ClipRefused, PartialAnswers, Target

LOCK_NAME = "writer.lock"
HOLDER_BYTES = 1024  # the lock file's holder record, padded: see _write_holder
STORES = {"float16": np.float16, "float32": np.float32}
DEFAULT_STORE = "float16"
FLOAT16_MAX = float(np.finfo(np.float16).max)


class LedgerError(SpeechmimicError, RuntimeError):
    """A ledger cannot do what was asked; the message says why and what to do."""


class BudgetExhausted(LedgerError):
    """A run needed answers its ledger refused to pay for: they would exceed the budget."""


class DamagedAnswerError(LedgerError):
    """A stored answer is missing, unreadable or no longer matches the digest recorded when it was
    paid; ``clip_id``, ``key`` and ``path`` name it."""

    def __init__(self, root: Path, clip_id: str, key: str, path: Path, reason: str):
        self.clip_id, self.key, self.path, self.reason = clip_id, key, path, reason
        super().__init__(
            f"the answer to clip {clip_id!r} (key {key[:12]}…) in ledger {root} is damaged: {reason}. "
            f"Buy it again with `speechmimic query --repair` on a manifest holding the clip, or drop "
            f"it with `speechmimic ledger verify {root} --drop`"
        )


def in_shard(key: str, i: int, n: int) -> bool:
    """Whether content ``key`` belongs to shard ``i`` of ``n``: by the key, so identical audio under
    two names lands in one shard, and shards never overlap."""
    return int(key[:15], 16) % n == i


def content_key(wav: np.ndarray) -> str:
    """The key of a clip: SHA-256 of its 16 kHz mono float32 samples."""
    return hashlib.sha256(np.ascontiguousarray(wav, dtype=np.float32).tobytes()).hexdigest()


def answer_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of an answer's arrays (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _fits_float16(a: np.ndarray) -> bool:
    finite = a[np.isfinite(a)]
    return finite.size == 0 or float(np.abs(finite).max()) <= FLOAT16_MAX


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique_tmp(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer can choose."""
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@dataclass
class Entry:
    """One paid response: which clip, how long it was, how many frames each layer returned, the
    digest of its arrays (None in ledgers written before digests) and when it was paid."""

    key: str
    clip_id: str
    num_samples: int
    frames: dict[str, int]
    digest: str | None = None
    time: float | None = None

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE


@dataclass
class Report:
    """What :meth:`Ledger.verify` found. ``damaged`` and ``missing``: (clip id, key, reason);
    ``unverified``: keys paid before digests were recorded; ``unindexed``: answers on disk whose
    ``paid`` line a killed writer never wrote (the next writer indexes them); ``leftovers``:
    temporary files of killed writers."""

    checked: int = 0
    damaged: list[tuple[str, str, str]] = field(default_factory=list)
    missing: list[tuple[str, str, str]] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    unindexed: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    torn_tail: bool = False

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.missing)


class Ledger:
    """Append-only, crash-safe store of the responses a target returned.

    ``budget`` caps what may be paid in total over the ledger's lifetime (already paid responses
    count); the default caps nothing.
    """

    def __init__(self, root: str | os.PathLike, budget: Budget | None = None, store: str | None = None):
        if store is not None and store not in STORES:
            raise InputError(f"store {store!r}: choose {' or '.join(STORES)}")
        self.root = Path(root)
        self.budget = budget or Budget()
        self._store_request = store
        self.entries: dict[str, Entry] = {}
        self.aliases: dict[str, str] = {}  # clip id -> key, for every clip id seen
        self.header: dict | None = None
        self.spent_clips = 0
        self.spent_samples = 0  # at 16 kHz: exact, comparable with what an API charged
        self.dropped = 0
        self._sent: set[str] = set()
        self._ever_paid: set[str] = set()
        self._unindexed: set[str] = set()  # answers known from their blob only (no paid line yet)
        self._charged: set[tuple[str, float | None]] = set()  # payments merged in beside their answer
        self._offset = 0  # bytes of the index read so far (complete lines only)
        self._torn = False
        self._holding = False
        self._repaired = False
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)
        self._read_header()
        self._read_index()
        self._find_unindexed()
        try:
            with self._writing(wait=False) as holding:
                pass  # holding: the repairs a writer makes are done; else another writer will
        except OSError:
            holding = False  # a read-only ledger: readers need no lock
        self._repaired = holding

    # -- reading -----------------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / "index.jsonl"

    def _blob_path(self, key: str) -> Path:
        return self.root / "blobs" / key[:2] / f"{key}.safetensors"

    def _read_header(self) -> None:
        path = self.root / "ledger.json"
        if path.exists():
            self.header = json.loads(path.read_text())

    def _read_index(self) -> None:
        """Apply the index's complete lines appended since the last read (by anyone)."""
        if not self.index_path.exists():
            return
        with open(self.index_path, "rb") as f:
            f.seek(self._offset)
            raw = f.read()
        good = raw.rfind(b"\n") + 1
        for line in raw[:good].splitlines():
            self._apply(json.loads(line))
        self._offset += good
        self._torn = good < len(raw)

    def _apply(self, event: dict) -> None:
        kind = event["event"]
        if kind == "send":
            self._sent.update(event["keys"])
        elif kind == "paid":
            entry = Entry(
                event["key"], event["clip_id"], event["num_samples"], event["frames"],
                event.get("digest"), event.get("time"),
            )  # fmt: skip
            if entry.key in self._unindexed:  # already counted from its blob
                self._unindexed.discard(entry.key)
            else:
                self._count_payment(entry)
            self._add(entry)
        elif kind == "refused":
            self._sent.discard(event["key"])
        elif kind == "alias":
            self.aliases[event["clip_id"]] = event["key"]
        elif kind == "drop":
            self.entries.pop(event["key"], None)
            self.dropped += 1
        elif kind == "charge":
            self._charge(
                event["key"],
                Entry(event["key"], event["clip_id"], event["num_samples"], {}, None, event.get("time")),
            )

    def _find_unindexed(self) -> None:
        """Blobs renamed into place whose ``paid`` line never made it: safe, paid answers."""
        for blob in sorted((self.root / "blobs").glob("*/*.safetensors")):
            key = blob.stem
            if key in self.entries or key in self._unindexed:
                continue
            try:
                meta = _read_metadata(blob)
                entry = Entry(
                    key, meta["clip_id"], int(meta["num_samples"]), json.loads(meta["frames"]),
                    meta.get("digest"), json.loads(meta.get("time", "null")) or blob.stat().st_mtime,
                )  # fmt: skip
                if entry.digest is not None and answer_digest(load_file(blob)) != entry.digest:
                    continue  # damaged before it was ever indexed: not an answer, buy it again
            except (OSError, KeyError, ValueError, SafetensorError):
                continue
            self._unindexed.add(key)
            self._count_payment(entry)
            self._add(entry)

    def _charge(self, key: str, entry: Entry) -> None:
        """A second payment for an answer already held (merged from another ledger)."""
        self._charged.add((key, entry.time))
        self._count_payment(entry)

    def _count_payment(self, entry: Entry) -> None:
        self.spent_clips += 1
        self.spent_samples += entry.num_samples

    @property
    def spent_seconds(self) -> float:
        return self.spent_samples / SAMPLE_RATE

    def _add(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        self._ever_paid.add(entry.key)
        self.aliases.setdefault(entry.clip_id, entry.key)

    @property
    def in_doubt(self) -> set[str]:
        """Keys sent and never answered (the run that sent them stopped first)."""
        return self._sent - self._ever_paid

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def key_of(self, clip_id: str) -> str | None:
        return self.aliases.get(clip_id)

    @property
    def store(self) -> str:
        """How answers are stored: ``float16`` or ``float32`` (ledgers older than the choice)."""
        if self.header is None:
            return self._store_request or DEFAULT_STORE
        return self.header.get("store", "float32")

    def get(self, key: str, dtype: type | None = np.float32) -> dict[str, np.ndarray]:
        """The response paid for ``key``: ``{layer: frames (T, D)}`` as ``dtype`` (None: as stored),
        its digest verified; :class:`DamagedAnswerError` if it is missing, unreadable or no longer
        matches."""
        entry = self.entries[key]
        path = self._blob_path(key)

        def damaged(reason: str) -> DamagedAnswerError:
            return DamagedAnswerError(self.root, entry.clip_id, key, path, reason)

        try:
            arrays = load_file(path)
        except FileNotFoundError:
            raise damaged("its file is missing") from None
        except (OSError, SafetensorError) as e:
            raise damaged(f"its file cannot be read ({e})") from None
        if entry.digest is not None and answer_digest(arrays) != entry.digest:
            raise damaged("its bytes no longer match the digest recorded when it was paid")
        if dtype is None:
            return arrays
        return {k: v.astype(dtype, copy=False) for k, v in arrays.items()}

    def frame_rates(self, keys: Iterable[str] | None = None) -> dict[str, float]:
        """Frames per second of each returned layer, read off the answers' frame counts alone.

        The rate is the slope of frames against seconds over the clips: edge frames (centred windows,
        receptive fields) only shift the intercept, so the slope is unbiased even on short clips.
        """
        entries = [self.entries[k] for k in (self.entries if keys is None else keys)]
        if not entries:
            raise LedgerError(f"ledger {self.root} holds no answers to read frame rates from")
        seconds = np.array([e.seconds for e in entries])
        rates = {}
        for name in entries[0].frames:
            frames = np.array([e.frames[name] for e in entries], dtype=float)
            if np.ptp(seconds) > 0.05:
                rates[name] = round(float(np.polyfit(seconds, frames, 1)[0]), 1)
            else:  # all clips of one length: no slope to fit
                rates[name] = round(float(np.median(frames / seconds)), 1)
        return rates

    def get_clip(self, clip_id: str) -> dict[str, np.ndarray]:
        key = self.key_of(clip_id)
        if key is None or key not in self.entries:
            raise NotFound(f"clip {clip_id!r} has no paid response in {self.root}")
        return self.get(key)

    def summary(self) -> dict:
        return {
            "target": (self.header or {}).get("target"),
            "paid_clips": self.spent_clips,
            "paid_seconds": round(self.spent_seconds, 3),
            "in_doubt": len(self.in_doubt),
            "budget_clips": self.budget.clips,
            "budget_seconds": self.budget.seconds,
        }

    def stats(self) -> dict:
        """What the ledger holds and has spent, for ``speechmimic ledger stats``."""
        times = [e.time for e in self.entries.values() if e.time is not None]
        blobs = [self._blob_path(k) for k in self.entries]
        header = self.header or {}
        return {
            "ledger": str(self.root),
            "target": header.get("target"),
            "layers": header.get("layers"),
            "frame_rate": header.get("frame_rate"),
            "answers": len(self.entries),
            "answer_seconds": round(sum(e.seconds for e in self.entries.values()), 3),
            "bytes": sum(p.stat().st_size for p in blobs if p.exists()),
            "payments": self.spent_clips,
            "paid_seconds": round(self.spent_seconds, 3),
            "in_doubt": len(self.in_doubt),
            "dropped": self.dropped,
            "first_payment": _iso(min(times)) if times else None,
            "last_payment": _iso(max(times)) if times else None,
        }

    def verify(self, keys: Iterable[str] | None = None, progress: bool = False) -> Report:
        """Check every answer (or those of ``keys``) against its digest, and the ledger's files."""
        report = Report(torn_tail=self._torn, unindexed=sorted(self._unindexed))
        report.leftovers = sorted(str(p) for p in self.root.glob("blobs/*/*.tmp"))
        wanted = list(self.entries) if keys is None else [k for k in keys if k in self.entries]
        for key in tqdm(wanted, desc="verify", unit="answer", disable=not progress):
            report.checked += 1
            try:
                self.get(key)
            except DamagedAnswerError as e:
                missing = not e.path.exists()
                (report.missing if missing else report.damaged).append((e.clip_id, key, e.reason))
                continue
            if self.entries[key].digest is None:
                report.unverified.append(key)
        return report

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

    # -- the writer lock ---------------------------------------------------------------------------
    @contextmanager
    def _writing(self, wait: bool = True):
        """Hold the writer lock (yields True), or with ``wait=False`` yield False if another process
        holds it. On taking it: read what others wrote meanwhile, and repair what a killed writer
        left (a torn index line, unindexed answers, temporary files)."""
        if self._holding:
            yield True
            return
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                print(
                    f"ledger {self.root} is being written by {_holder(fd)}; waiting for it to finish "
                    "(Ctrl-C stops this run, nothing is lost)",
                    file=sys.stderr,
                    flush=True,
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
            died = not _holder_record(fd).get("clean", True)  # its holder was killed mid-write
            _write_holder(fd, clean=False)
            self._holding = True
            try:
                self._read_header()
                self._read_index()
                if died or not self._repaired:
                    self._repair()
                yield True
            finally:
                self._holding = False
                _write_holder(fd, clean=True)
        finally:
            os.close(fd)  # releases the lock

    def _repair(self) -> None:
        if self._torn:  # a crash mid-append: drop the torn line
            with open(self.index_path, "r+b") as f:
                f.truncate(self._offset)
                f.flush()
                os.fsync(f.fileno())
            self._torn = False
        self._find_unindexed()
        for key in sorted(self._unindexed):
            self._append({"event": "paid", **_entry_json(self.entries[key])})
        self._unindexed.clear()
        for tmp in self.root.glob("blobs/*/*.tmp"):
            tmp.unlink(missing_ok=True)  # only a writer makes these, and the writer is us
        self._repaired = True

    # -- writing (under the lock) ------------------------------------------------------------------
    def _append(self, event: dict) -> None:
        line = (json.dumps(event, sort_keys=True) + "\n").encode()
        fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write() per event: a crash leaves at most one torn last line
            os.fsync(fd)
        finally:
            os.close(fd)
        self._offset += len(line)

    def bind(self, target: Target) -> None:
        """Record which target this ledger pays; refuse to mix responses of two targets."""
        header = {
            "target": target.spec,
            "frame_rate": target.frame_rate,
            "layers": None if target.layers is None else list(target.layers),
            "padding": target.padding,
            "sample_rate": SAMPLE_RATE,
            "store": self.store,
        }
        with self._writing():
            if self.header is None:
                self._write_header(header)
            elif self._store_request not in (None, self.store):
                raise LedgerError(
                    f"ledger {self.root} stores its answers as {self.store}, not {self._store_request}: "
                    "the choice is made when a ledger is created (use a new ledger folder)"
                )
            elif self.header["target"] != header["target"] or (
                None not in (self.header["layers"], header["layers"])
                and self.header["layers"] != header["layers"]
            ):
                raise InputError(
                    f"ledger {self.root} holds responses of {self.header['target']} (layers "
                    f"{self.header['layers']}), not {header['target']} (layers {header['layers']})"
                )

    def _write_header(self, header: dict) -> None:
        path = self.root / "ledger.json"
        tmp = _unique_tmp(path)
        tmp.write_text(json.dumps(header, indent=2))
        os.replace(tmp, path)
        _fsync_dir(self.root)
        self.header = header

    def _check_layers(self, response: dict[str, np.ndarray]) -> None:
        """The first answer of a target that did not say what it returns says it; every later answer
        must return the same layers, or two targets' answers would mix."""
        layers = list(response)
        if self.header["layers"] is None:
            self._write_header({**self.header, "layers": layers})
        elif sorted(layers) != sorted(self.header["layers"]):
            raise LedgerError(
                f"{self.header['target']} returned layers {layers}; this ledger holds "
                f"{self.header['layers']}: "
                "the API changed what it returns, so its answers cannot share one ledger"
            )

    def _store(self, key: str, clip_id: str, wav: np.ndarray, response: dict[str, np.ndarray]) -> Entry:
        self._check_layers(response)
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in response.items()}
        if self.store == "float16" and all(_fits_float16(v) for v in arrays.values()):
            arrays = {k: v.astype(np.float16) for k, v in arrays.items()}
        entry = Entry(
            key, clip_id, int(len(wav)), {k: int(v.shape[0]) for k, v in arrays.items()},
            answer_digest(arrays), round(time.time(), 3),
        )  # fmt: skip
        self._write_answer(entry, arrays)
        return entry

    def _write_answer(self, entry: Entry, arrays: dict[str, np.ndarray]) -> None:
        """Crash-safety rule 2 (module docstring): the blob is in place before its ``paid`` event."""
        key = entry.key
        path = self._blob_path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = _unique_tmp(path)
        meta = {
            "clip_id": entry.clip_id,
            "num_samples": str(entry.num_samples),
            "frames": json.dumps(entry.frames),
            "digest": entry.digest,
            "time": json.dumps(entry.time),  # a merge tells a rerun from a second payment by it
        }
        save_file(arrays, tmp, meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        self._append({"event": "paid", **_entry_json(entry)})
        self._count_payment(entry)
        self._add(entry)

    def drop(self, keys: Iterable[str], reason: str = "damaged") -> list[str]:
        """Move the answers of ``keys`` to ``damaged/`` and forget them, so the next query buys them
        again; returns the keys dropped. What they cost stays spent."""
        dropped = []
        with self._writing():
            for key in keys:
                if key not in self.entries:
                    continue
                path = self._blob_path(key)
                if path.exists():
                    (self.root / "damaged").mkdir(exist_ok=True)
                    os.replace(path, self.root / "damaged" / f"{key}.{int(time.time())}.safetensors")
                self._append({"event": "drop", "key": key, "reason": reason, "time": time.time()})
                self.entries.pop(key)
                self.dropped += 1
                dropped.append(key)
        return dropped

    def repair(self, keys: Iterable[str] | None = None) -> list[str]:
        """Drop every damaged or missing answer among ``keys`` (default: all), to be bought again."""
        report = self.verify(keys)
        return self.drop([key for _, key, _ in report.damaged + report.missing])

    def merge(self, other: Ledger, progress: bool = True) -> dict:
        """Copy into this ledger the answers of ``other``, a ledger of the same target (a shard
        another worker or machine filled); returns what was merged, already here and left out.

        Each answer is verified against its digest, then written as :meth:`query` writes one (blob
        renamed into place, then its ``paid`` event), so a killed merge loses nothing and a rerun
        copies only what is missing. Clip names travel with their answers. An answer both ledgers
        paid for separately (overlapping shards) is kept once and its second payment is recorded as
        a ``charge``, so what this ledger has spent stays the sum of what was paid.
        """
        if other.header is None:
            return {"merged": 0, "already_here": 0, "paid_twice": 0, "damaged": [], "in_doubt": 0}
        with self._writing():
            if self.header is None:
                self._write_header(dict(other.header))
            for field_ in ("target", "layers", "store"):
                mine, theirs = self.header.get(field_), other.header.get(field_)
                if mine != theirs and None not in (mine, theirs):
                    raise LedgerError(
                        f"cannot merge {other.root} into {self.root}: its {field_} is {theirs!r}, "
                        f"not {mine!r}"
                    )
            merged, here, twice, damaged = 0, 0, 0, []
            for key, entry in tqdm(
                list(other.entries.items()),
                desc=f"merge {other.root.name}",
                unit="answer",
                disable=not progress,
            ):
                mine = self.entries.get(key)
                if mine is not None:
                    same = (mine.time, mine.digest) == (entry.time, entry.digest)
                    if same or (key, entry.time) in self._charged:
                        here += 1  # this very payment is already here (a rerun)
                    else:
                        self._append({"event": "charge", **_entry_json(entry), "source": str(other.root)})
                        self._charge(key, entry)
                        twice += 1
                    continue
                try:
                    arrays = other.get(key, dtype=None)
                except DamagedAnswerError as e:
                    damaged.append((entry.clip_id, key, e.reason))
                    continue
                if entry.digest is None:  # paid before digests: give it one now that it is read
                    entry = replace(entry, digest=answer_digest(arrays))
                self._write_answer(entry, arrays)
                merged += 1
            for clip_id, key in other.aliases.items():
                if key in self.entries and clip_id not in self.aliases:
                    self._append({"event": "alias", "clip_id": clip_id, "key": key})
                    self.aliases[clip_id] = key
        return {
            "merged": merged,
            "already_here": here,
            "paid_twice": twice,
            "damaged": damaged,
            "in_doubt": len(other.in_doubt),
        }

    def _would_exceed(self, extra_clips: int, extra_seconds: float) -> bool:
        return not self.budget.allows(self.spent_clips + extra_clips, self.spent_seconds + extra_seconds)

    def query(
        self,
        target: Target,
        clips: Iterable[tuple[str, Callable[[], np.ndarray]]],
        batch_size: int = 8,
        progress: bool = True,
        total: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> dict:
        """Pay for the responses of ``clips`` (pairs of clip id and a loader of its waveform).

        ``shard=(i, n)``: pay only the clips whose content key falls in shard ``i`` of ``n``
        (:func:`in_shard`; the others count as ``other_shards``), so ``n`` workers, each with its
        own ledger, split one manifest without paying any audio twice; :meth:`merge` joins them.

        Clips already paid (by id or by content, by this process or another) cost nothing; a clip
        that would exceed the budget is skipped and counted as ``over_budget``; a clip whose loader
        raises :class:`AudioError` is listed in ``unusable`` with the reason. Holds the writer lock
        throughout (waiting for another writer to finish). Returns what was paid, reused and skipped.
        """
        if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise InputError(f"shard {shard[0]}/{shard[1]}: need 0 <= i < n")
        with self._writing():
            return self._query(target, clips, batch_size, progress, total, shard)

    def _query(self, target, clips, batch_size, progress, total, shard) -> dict:
        self.bind(target)
        takes_keys = "keys" in inspect.signature(target.__call__).parameters
        paid = reused = over_budget = other_shards = 0
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
            self._sent.update(keys)
            wavs = [w for _, _, w in batch]
            failed: dict[int, Exception] = {}
            try:
                responses = target(wavs, keys=keys) if takes_keys else target(wavs)
            except PartialAnswers as e:  # keep what was answered (and charged) before anything else
                responses, failed = e.answers, e.errors
            for i, ((clip_id, key, wav), response) in enumerate(zip(batch, responses, strict=True)):
                if response is not None:
                    self._store(key, clip_id, wav, response)
                    paid += 1
                elif isinstance(failed[i], ClipRefused):  # that clip's failure, not the run's
                    self._append({"event": "refused", "key": key, "reason": failed[i].reason})
                    self._sent.discard(key)
                    unusable.append((clip_id, failed[i].reason))
            batch.clear()
            pending.clear()
            fatal = [e for e in failed.values() if not isinstance(e, ClipRefused)]
            if fatal:
                raise fatal[0]

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
            if shard is not None and not in_shard(key, *shard):
                other_shards += 1
                continue
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
            **({"other_shards": other_shards} if shard is not None else {}),
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
    shard: tuple[int, int] | None = None,
) -> dict:
    """Pay for the target's answers to ``clips`` (already paid ones are reused); ``shard``: see
    :meth:`Ledger.query`.

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
    stats = ledger.query(
        target, loader, batch_size=batch_size, progress=progress, total=len(clips), shard=shard
    )
    return {**stats, "over_budget": stats["over_budget"] + refused}


def _entry_json(entry: Entry) -> dict:
    event = {
        "key": entry.key,
        "clip_id": entry.clip_id,
        "num_samples": entry.num_samples,
        "frames": entry.frames,
    }
    if entry.digest is not None:
        event["digest"] = entry.digest
    if entry.time is not None:
        event["time"] = entry.time
    return event


def _read_metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="numpy") as f:
        return dict(f.metadata() or {})


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


# The lock file's content: who holds (or last held) the lock, and whether they finished cleanly.
def _holder_record(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _holder(fd: int) -> str:
    # The holder writes its record just after taking the lock: a writer that meets the lock at
    # that instant reads nothing yet, so it looks again for a moment before saying "another process".
    for _ in range(20):
        r = _holder_record(fd)
        if r:
            break
        time.sleep(0.01)
    else:
        return "another process"
    return f"pid {r.get('pid')} on {r.get('host')} ({r.get('command')}, since {r.get('since')})"


def _write_holder(fd: int, clean: bool) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv)[:200],
        "since": _iso(time.time()),
        "clean": clean,
    }
    # One write of a fixed size over the old record (never a truncate first): a reader sees the old
    # record or the new one, not an empty file (json reads the padding as whitespace).
    data = json.dumps(record).encode().ljust(HOLDER_BYTES)
    os.pwrite(fd, data, 0)
