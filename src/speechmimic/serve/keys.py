"""API keys, their limits and their usage, and the answers stored under idempotency keys: one SQLite
file (WAL, ``synchronous=FULL``), so what was committed survives a restart or a ``kill -9``.

A key is shown once, when it is created; only its SHA-256 is stored (keys are 256 random bits, so a
fast hash is enough). Usage is counted in requests and in samples at 16 kHz (exact integers: the
server's charged seconds can be compared with a ledger's to the sample). The charge for an answer
and the answer itself are committed in one transaction before the answer is sent: an answer that was
charged can be fetched again for free (under its ``Idempotency-Key``, or, without one, by sending the
same request again within a short time), and one that was not committed was never charged.

Stored answers are bounded: :meth:`KeyStore.purge` drops those past their time (answers without an
``Idempotency-Key`` go first) and then the oldest, until the store is under its size cap.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from speechmimic.audio import SAMPLE_RATE
from speechmimic.errors import InputError, NotFound

TOKEN_PREFIX = "smk_"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL,
    quota_requests INTEGER,
    quota_seconds REAL,
    rate REAL,
    burst REAL,
    max_bytes INTEGER,
    max_seconds REAL,
    requests INTEGER NOT NULL DEFAULT 0,
    samples INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS answers (
    key_id INTEGER NOT NULL REFERENCES keys(id),
    idempotency_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    samples INTEGER NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (key_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS answers_created ON answers(created);
"""
LIMITS = ("quota_requests", "quota_seconds", "rate", "burst", "max_bytes", "max_seconds")
# The store key of an answer given without an Idempotency-Key: this prefix and the request's hash. A
# tab is not printable, so no client's Idempotency-Key can take the same name.
IMPLICIT = "\tsha256:"


class QuotaExceeded(Exception):
    def __init__(self, what: str):
        self.what = what
        super().__init__(what)


@dataclass(frozen=True)
class Key:
    id: int
    name: str
    created: float
    revoked: float | None
    quota_requests: int | None
    quota_seconds: float | None
    rate: float | None  # requests per second, refilled continuously
    burst: float | None  # bucket size (default: max(1, rate))
    max_bytes: int | None
    max_seconds: float | None
    requests: int
    samples: int

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    def over_quota(self, requests: int, samples: int) -> str | None:
        """What a key that had already used ``requests`` and ``samples`` would exceed, or None."""
        if self.quota_requests is not None and requests > self.quota_requests:
            return f"request quota of {self.quota_requests} spent ({self.requests} used)"
        if self.quota_seconds is not None and samples > round(self.quota_seconds * SAMPLE_RATE):
            return f"audio quota of {self.quota_seconds:g} s spent ({self.seconds:.1f} s used)"
        return None

    def public(self) -> dict:
        """What ``keys list`` and ``/v1/usage`` show: never the hash."""
        return {
            "name": self.name,
            "created": self.created,
            "revoked": self.revoked,
            **{k: getattr(self, k) for k in LIMITS},
            "requests": self.requests,
            "samples": self.samples,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class StoredAnswer:
    request_hash: str
    samples: int
    body: bytes


@dataclass
class _Charge:
    key_id: int
    samples: int
    store_key: str
    request_hash: str
    body: bytes
    done: bool = False
    earlier: StoredAnswer | None = None
    error: BaseException | None = None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class KeyStore:
    """The SQLite file behind the server and ``speechmimic keys``; safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()  # the writing connection
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        # Lookups on a connection of their own: under WAL they never wait for a commit's fsync.
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._reader.row_factory = sqlite3.Row
        self._read_lock = threading.Lock()
        self._group = threading.Condition()
        self._queue: list[_Charge] = []
        self._committing = False

    def close(self) -> None:
        self._reader.close()
        self._db.close()

    # -- keys --------------------------------------------------------------------------------------
    def create(self, name: str, **limits) -> tuple[Key, str]:
        """A new key named ``name`` with ``limits`` (see :data:`LIMITS`); returns it and its token,
        which is shown this once and never stored."""
        unknown = set(limits) - set(LIMITS)
        if unknown:
            raise InputError(f"unknown key limit(s) {sorted(unknown)}; valid: {list(LIMITS)}")
        for k, v in limits.items():
            if v is not None and not v > 0:
                raise InputError(f"{k} must be > 0, got {v}")
        if not name or not name.isprintable() or len(name) > 100:
            raise InputError(f"a key name is 1 to 100 printable characters, got {name!r}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        values = {k: limits.get(k) for k in LIMITS}
        with self._lock:
            try:
                self._db.execute(
                    f"INSERT INTO keys (name, hash, created, {', '.join(LIMITS)}) "
                    f"VALUES (?, ?, ?, {', '.join('?' * len(LIMITS))})",
                    (name, token_hash(token), time.time(), *values.values()),
                )
            except sqlite3.IntegrityError:
                raise InputError(f"a key named {name!r} exists already") from None
        return self.find(name), token

    def find(self, name: str) -> Key:
        row = self._one("SELECT * FROM keys WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"no key named {name!r} in {self.path}")
        return _key(row)

    def get(self, key_id: int) -> Key:
        return _key(self._one("SELECT * FROM keys WHERE id = ?", (key_id,)))

    def list(self) -> list[Key]:
        with self._read_lock:
            return [_key(r) for r in self._reader.execute("SELECT * FROM keys ORDER BY id")]

    def revoke(self, name: str) -> Key:
        key = self.find(name)
        if key.revoked is None:
            with self._lock:
                self._db.execute("UPDATE keys SET revoked = ? WHERE id = ?", (time.time(), key.id))
        return self.find(name)

    def authenticate(self, token: str) -> Key | None:
        row = self._one("SELECT * FROM keys WHERE hash = ?", (token_hash(token),))
        return None if row is None else _key(row)

    # -- answers and charges -----------------------------------------------------------------------
    def stored(self, key_id: int, idempotency_key: str) -> StoredAnswer | None:
        """The answer stored under ``idempotency_key`` for this key, if any."""
        with self._read_lock:
            return self._stored(key_id, idempotency_key, self._reader)

    def _stored(
        self, key_id: int, idempotency_key: str, db: sqlite3.Connection | None = None
    ) -> StoredAnswer | None:
        row = (
            (db or self._db)
            .execute(
                "SELECT request_hash, samples, body FROM answers WHERE key_id = ? AND idempotency_key = ?",
                (key_id, idempotency_key),
            )
            .fetchone()
        )
        return None if row is None else StoredAnswer(row["request_hash"], row["samples"], bytes(row["body"]))

    def charge(
        self, key_id: int, samples: int, store_key: str, request_hash: str, body: bytes
    ) -> StoredAnswer | None:
        """Charge one request of ``samples`` and store its answer under ``store_key`` (its
        Idempotency-Key, or :data:`IMPLICIT` + ``request_hash``), committed before this returns.
        Returns the answer stored before if that key was answered meanwhile (nothing is charged then);
        raises :class:`QuotaExceeded` (nothing charged) if the quota does not allow it.

        Group commit: charges that arrive while a commit is being written wait for it and are then
        committed together, one transaction and one fsync for all of them, by whichever caller comes
        first. Each caller still returns only once its own charge is on disk; a full fsync per request
        would cap the server at the disk's fsync rate."""
        item = _Charge(key_id, samples, store_key, request_hash, body)
        with self._group:
            self._queue.append(item)
            while not item.done and self._committing:
                self._group.wait()
            lead = not item.done
            if lead:
                self._committing = True
                batch, self._queue = self._queue, []
        if lead:
            try:
                self._commit(batch)
            finally:
                with self._group:
                    self._committing = False
                    self._group.notify_all()
        if item.error is not None:
            raise item.error
        return item.earlier

    def _commit(self, batch: list[_Charge]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for item in batch:  # later items see earlier ones: same transaction
                    self._apply(item)
                self._db.execute("COMMIT")
            except BaseException as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                for item in batch:
                    item.earlier, item.error = None, item.error or e
                if not isinstance(e, Exception):
                    raise
            finally:
                for item in batch:
                    item.done = True

    def _apply(self, item: _Charge) -> None:
        item.earlier = self._stored(item.key_id, item.store_key)
        if item.earlier is not None:
            return
        key = _key(self._db.execute("SELECT * FROM keys WHERE id = ?", (item.key_id,)).fetchone())
        exceeded = key.over_quota(key.requests + 1, key.samples + item.samples)
        if exceeded:
            item.error = QuotaExceeded(exceeded)
            return
        self._db.execute(
            "INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?)",
            (item.key_id, item.store_key, item.request_hash, item.samples, item.body, time.time()),
        )
        self._db.execute(
            "UPDATE keys SET requests = requests + 1, samples = samples + ? WHERE id = ?",
            (item.samples, item.key_id),
        )

    def purge(self, keyed_seconds: float, unkeyed_seconds: float, max_bytes: int) -> dict[str, int]:
        """Drop stored answers past their time (``keyed_seconds`` for those under an Idempotency-Key,
        ``unkeyed_seconds`` for the others), then, while the answers take more than ``max_bytes``,
        the oldest: those without an Idempotency-Key first. Returns what was dropped and what is left."""
        now = time.time()
        implicit = f"substr(idempotency_key, 1, {len(IMPLICIT)}) = ?"
        with self._lock:
            dropped = self._db.execute(
                f"DELETE FROM answers WHERE created < ? OR ({implicit} AND created < ?)",
                (now - keyed_seconds, IMPLICIT, now - unkeyed_seconds),
            ).rowcount
            total = self._db.execute("SELECT coalesce(sum(length(body)), 0) FROM answers").fetchone()[0]
            for unkeyed in (True, False):
                if total <= max_bytes:
                    break
                rows = self._db.execute(
                    f"SELECT rowid, length(body) FROM answers WHERE ({implicit}) = ? ORDER BY created",
                    (IMPLICIT, unkeyed),
                ).fetchall()
                doomed = []
                for rowid, size in rows:
                    if total <= max_bytes:
                        break
                    doomed.append(rowid)
                    total -= size
                self._db.executemany("DELETE FROM answers WHERE rowid = ?", [(r,) for r in doomed])
                dropped += len(doomed)
            left = self._db.execute("SELECT count(*) FROM answers").fetchone()[0]
        return {"dropped": dropped, "answers": left, "bytes": total}

    def _one(self, sql: str, args: tuple):
        with self._read_lock:
            return self._reader.execute(sql, args).fetchone()


def _key(row: sqlite3.Row) -> Key:
    return Key(**{k: row[k] for k in row.keys() if k != "hash"})
