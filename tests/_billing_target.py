"""A fake *paid* embedding API for the SIGKILL tests of :mod:`speechmimic.ledger`.

Imported by ``test_ledger.py`` (for the deterministic clips and responses) and run as a script by
the subprocesses the tests kill::

    python _billing_target.py --ledger DIR --state DIR --num-clips N --batch-size B
                              [--plain] [--hang-at CALL] [--latency SECONDS] [--budget-clips N]

The "server side" of the API keeps its state in files under ``--state`` because the client process
(which hosts this simulation) is SIGKILLed:

* ``requests.log``: one JSON line per call, ``{"call": n, "keys": [...]}``, written when the request
  reaches the server;
* ``charges.log`` (keyed target only): one content key per line, appended and fsynced the first
  time an idempotency key is seen; a repeated key is answered from the server's cache, not charged;
* ``calls/call-NNNN`` (plain target only): a marker written when call NNNN starts.

Every line is written with a single ``write()`` on an ``O_APPEND`` descriptor; readers ignore a
torn tail and writers cut it off before appending.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

SR = 16_000
SPEC = "fake:billing"
LAYERS = ["a", "b"]


def _sha(wav: np.ndarray) -> str:
    # Same definition as speechmimic.ledger.content_key (kept independent on purpose).
    return hashlib.sha256(np.ascontiguousarray(wav, dtype=np.float32).tobytes()).hexdigest()


def source_of(i: int) -> int:
    """Clip ``i`` carries the audio of clip ``source_of(i)``: every 25th clip duplicates an earlier one."""
    return i - 7 if i % 25 == 24 else i


def clip_id(i: int) -> str:
    return f"clip{i:04d}"


def make_wav(i: int) -> np.ndarray:
    """The deterministic waveform of clip ``i``: 0.2-2 s of seeded noise at 16 kHz."""
    rng = np.random.default_rng([1234, source_of(i)])
    n = int(rng.integers(int(0.2 * SR), 2 * SR + 1))
    return (0.1 * rng.standard_normal(n)).astype(np.float32)


def respond(wav: np.ndarray) -> dict[str, np.ndarray]:
    """The deterministic answer of the API: 50 Hz frame statistics (a) and 25 Hz energies (b)."""
    wav = np.asarray(wav, dtype=np.float32)
    t = len(wav) // 320
    fa = wav[: t * 320].reshape(t, 320)
    a = np.stack([fa.mean(1), fa.std(1), fa.max(1), fa.min(1)], axis=1)
    t2 = len(wav) // 640
    fb = wav[: t2 * 640].reshape(t2, 640)
    zc = (np.diff(np.sign(fb), axis=1) != 0).mean(1)
    b = np.stack([(fb**2).mean(1), np.abs(fb).mean(1), zc], axis=1)
    return {"a": a.astype(np.float32), "b": b.astype(np.float32)}


def _append_line(path: Path, text: str, fsync: bool = True) -> None:
    if path.exists():  # a torn tail (crash mid-write) is dropped, like the ledger does with its index
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            os.truncate(path, raw.rfind(b"\n") + 1)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[str]:
    """Complete lines of ``path`` (a torn tail, if any, is ignored); [] if it does not exist."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    return raw[: raw.rfind(b"\n") + 1].decode().splitlines()


def read_requests(state: Path) -> list[dict]:
    return [json.loads(line) for line in read_lines(state / "requests.log")]


def read_charges(state: Path) -> Counter:
    return Counter(read_lines(state / "charges.log"))


class _Server:
    def __init__(self, state: str | os.PathLike, latency: float):
        self.state = Path(state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.latency = latency

    def _receive(self, keys: list[str]) -> int:
        call = len(read_lines(self.state / "requests.log")) + 1
        _append_line(self.state / "requests.log", json.dumps({"call": call, "keys": keys}))
        return call


class BillingTarget(_Server):
    """Paid API honouring idempotency keys: the first request with a key is charged, repeats are not."""

    spec = SPEC
    frame_rate = 50.0
    layers = LAYERS
    padding = "per_clip"
    min_samples = 640

    def __call__(self, wavs: list[np.ndarray], keys: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        if keys is None or len(keys) != len(wavs):
            raise RuntimeError("this API requires one idempotency key per clip")
        for key, wav in zip(keys, wavs, strict=True):
            if key != _sha(wav):
                raise RuntimeError(f"idempotency key {key} is not the content key of its clip")
        time.sleep(self.latency / 2)  # the request travels
        self._receive(keys)
        charged = set(read_lines(self.state / "charges.log"))
        for key in keys:
            if key not in charged:  # first time: charge and cache; a repeat is served from the cache
                _append_line(self.state / "charges.log", key)
                charged.add(key)
        out = [respond(w) for w in wavs]
        time.sleep(self.latency / 2)  # the answer travels back
        return out


class PlainTarget(_Server):
    """An API without idempotency keys (its ``__call__`` takes no ``keys=``); marks each call start."""

    spec = SPEC
    frame_rate = 50.0
    layers = LAYERS
    padding = "per_clip"
    min_samples = 640

    def __init__(self, state: str | os.PathLike, latency: float, hang_at: int | None = None):
        super().__init__(state, latency)
        self.hang_at = hang_at
        (self.state / "calls").mkdir(exist_ok=True)

    def __call__(self, wavs: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        call = self._receive([_sha(w) for w in wavs])
        _append_line(self.state / "calls" / f"call-{call:04d}", "started")
        time.sleep(600 if call == self.hang_at else self.latency)  # hang: the test kills us here
        return [respond(w) for w in wavs]


def _wait_for_parties(folder: Path, parties: int, timeout: float = 120.0) -> None:
    """Start together: concurrent runs that happen to start far apart (a loaded machine) never meet."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ready-{os.getpid()}").touch()
    end = time.monotonic() + timeout
    while len(list(folder.glob("ready-*"))) < parties:
        if time.monotonic() > end:
            sys.exit(
                f"only {len(list(folder.glob('ready-*')))} of {parties} runs came within {timeout:.0f} s"
            )
        time.sleep(0.002)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ledger", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--num-clips", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--latency", type=float, default=0.03)
    p.add_argument("--plain", action="store_true")
    p.add_argument("--hang-at", type=int, default=None)
    p.add_argument("--budget-clips", type=int, default=None, help="the ledger's lifetime cap")
    p.add_argument("--barrier", default=None, help="a folder: wait there for --parties runs before querying")
    p.add_argument("--parties", type=int, default=1)
    args = p.parse_args(argv)

    from speechmimic.budget import Budget
    from speechmimic.ledger import Ledger

    if args.plain:
        target = PlainTarget(args.state, args.latency, hang_at=args.hang_at)
    else:
        target = BillingTarget(args.state, args.latency)
    clips = ((clip_id(i), lambda i=i: make_wav(i)) for i in range(args.num_clips))
    ledger = Ledger(args.ledger, Budget(clips=args.budget_clips))
    if args.barrier:
        _wait_for_parties(Path(args.barrier), args.parties)
    stats = ledger.query(target, clips, batch_size=args.batch_size, progress=False)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
