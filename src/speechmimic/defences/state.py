"""Per-account defence state in one SQLite file, written after every query so a restart loses nothing.

A state is a dict of numpy arrays (scalars as 0-d arrays), stored as an ``.npz`` blob per (account,
defence slot); no pickles, so a state file cannot run code. With no path the store lives in memory
(one process, gone when it ends).
"""

from __future__ import annotations

import io
import sqlite3
import threading
from pathlib import Path

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    account TEXT NOT NULL,
    slot TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (account, slot)
)
"""


def _pack(state: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    return buf.getvalue()


def _unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class StateStore:
    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            ":memory:" if self.path is None else str(self.path), check_same_thread=False, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL" if self.path else "PRAGMA journal_mode=MEMORY")
        self._db.execute(_SCHEMA)
        self._db.commit()
        self._cache: dict[str, dict[str, dict]] = {}
        self.lock = threading.RLock()  # one query of one account at a time through the chain

    def load(self, account: str) -> dict[str, dict[str, np.ndarray]]:
        """``{slot: state}`` of ``account`` (empty for a new account)."""
        with self.lock:
            if account not in self._cache:
                rows = self._db.execute("SELECT slot, value FROM state WHERE account = ?", (account,))
                self._cache[account] = {slot: _unpack(value) for slot, value in rows}
            return self._cache[account]

    def save(self, account: str, states: dict[str, dict[str, np.ndarray]]) -> None:
        """Write every slot of ``account`` in one transaction."""
        with self.lock:
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO state (account, slot, value) VALUES (?, ?, ?)",
                    [(account, slot, _pack(s)) for slot, s in states.items()],
                )
            self._cache[account] = states

    def accounts(self) -> list[str]:
        with self.lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT account FROM state ORDER BY account")]

    def close(self) -> None:
        self._db.close()
