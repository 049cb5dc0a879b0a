"""The ledger of paid queries: round trips, dedup, budgets, crash recovery, and SIGKILL resume."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from speechmimic.budget import Budget
from speechmimic.ledger import Ledger, LedgerError, content_key

SR = 16_000
HERE = Path(__file__).resolve().parent
BILLING_SCRIPT = HERE / "_billing_target.py"

_spec = importlib.util.spec_from_file_location("_billing_target", BILLING_SCRIPT)
billing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(billing)


# -- a small deterministic target honouring the Target protocol ---------------------------------------
def _features(wav: np.ndarray) -> dict[str, np.ndarray]:
    t = len(wav) // 320
    fa = wav[: t * 320].reshape(t, 320).astype(np.float64)
    a = np.stack([fa.mean(1), fa.std(1), np.abs(fa).max(1), (fa**2).mean(1)], axis=1)
    t2 = len(wav) // 640
    fb = wav[: t2 * 640].reshape(t2, 640).astype(np.float64)
    b = np.stack([fb.mean(1), np.sqrt((fb**2).mean(1)), fb[:, ::2].mean(1)], axis=1)
    return {"a": a.astype(np.float32), "b": b.astype(np.float32)}


class FakeTarget:
    """Deterministic in-process target; counts how often each clip (by content) is requested."""

    frame_rate = 50.0
    padding = "per_clip"
    min_samples = 640

    def __init__(self, spec: str = "fake:test", layers=("a", "b"), fail_on_call: int | None = None):
        self.spec = spec
        self.layers = list(layers)
        self.fail_on_call = fail_on_call
        self.calls: list[list[str]] = []  # content keys of each call
        self.idem_keys: list[list[str] | None] = []  # the keys= argument of each call
        self.requests: Counter = Counter()

    def __call__(self, wavs: list[np.ndarray], keys: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        ks = [content_key(w) for w in wavs]
        self.calls.append(ks)
        self.idem_keys.append(None if keys is None else list(keys))
        self.requests.update(ks)
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise ConnectionError("simulated crash mid-request")
        return [_features(w) for w in wavs]


def _wavs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(int(0.2 * SR), 2 * SR + 1, size=n)
    return [(0.1 * rng.standard_normal(int(m))).astype(np.float32) for m in lengths]


def _clips(wavs, prefix: str = "c"):
    return [(f"{prefix}{i}", lambda w=w: w) for i, w in enumerate(wavs)]


def _events(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "index.jsonl").read_bytes().splitlines()]


def _paid_lines(root: Path) -> Counter:
    return Counter(e["key"] for e in _events(root) if e["event"] == "paid")


def _assert_response_equal(got: dict, want: dict, store: str = "float16") -> None:
    """``got`` is ``want`` as a ledger storing ``store`` (the default: float16) gives it back."""
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want[name].astype(store).astype(np.float32))


# -- unit tests ---------------------------------------------------------------------------------------
def test_paid_responses_round_trip(tmp_path):
    wavs = _wavs(7, seed=1)
    target = FakeTarget()
    ledger = Ledger(tmp_path / "led")
    stats = ledger.query(target, _clips(wavs), batch_size=3, progress=False)

    assert stats["paid"] == 7 and stats["reused"] == 0 and stats["over_budget"] == 0
    assert [len(c) for c in target.calls] == [3, 3, 1]
    assert ledger.spent_clips == len(ledger) == 7
    assert ledger.spent_seconds == pytest.approx(sum(len(w) for w in wavs) / SR)
    for i, w in enumerate(wavs):
        key = content_key(w)
        assert key in ledger and ledger.key_of(f"c{i}") == key
        _assert_response_equal(ledger.get(key), _features(w))
        _assert_response_equal(ledger.get_clip(f"c{i}"), _features(w))
        assert ledger.entries[key].num_samples == len(w)
        assert ledger.entries[key].frames == {"a": len(w) // 320, "b": len(w) // 640}
    with pytest.raises(KeyError):
        ledger.get_clip("never-queried")

    # Everything survives a reopen, byte for byte.
    again = Ledger(tmp_path / "led")
    assert set(again.keys()) == set(ledger.keys()) and again.in_doubt == set()
    assert again.spent_seconds == pytest.approx(ledger.spent_seconds)
    for i, w in enumerate(wavs):
        _assert_response_equal(again.get_clip(f"c{i}"), _features(w))
    assert json.loads((tmp_path / "led" / "ledger.json").read_text())["target"] == "fake:test"


def test_identical_audio_is_paid_once_and_rerun_pays_nothing(tmp_path):
    w = _wavs(4, seed=2)
    # "dup-same-batch" shares a batch with its twin; "dup-later" arrives after its twin was paid.
    clips = [
        ("a", lambda: w[0]),
        ("dup-same-batch", lambda: w[0].copy()),
        ("b", lambda: w[1]),
        ("c", lambda: w[2]),
        ("d", lambda: w[3]),
        ("dup-later", lambda: w[1].copy()),
    ]
    target = FakeTarget()
    ledger = Ledger(tmp_path / "led")
    stats = ledger.query(target, clips, batch_size=3, progress=False)
    assert stats["paid"] == 4 and stats["reused"] == 2
    assert all(n == 1 for n in target.requests.values()) and len(target.requests) == 4
    assert ledger.spent_clips == 4
    assert ledger.key_of("dup-same-batch") == ledger.key_of("a") == content_key(w[0])
    assert ledger.key_of("dup-later") == ledger.key_of("b")
    _assert_response_equal(ledger.get_clip("dup-same-batch"), _features(w[0]))
    _assert_response_equal(ledger.get_clip("dup-later"), _features(w[1]))

    # A re-run, in this process and after a reopen, pays nothing and does not even load known clips.
    def must_not_load():
        raise AssertionError("a clip already paid by id was loaded again")

    known = [(cid, must_not_load) for cid, _ in clips]
    for led in (ledger, Ledger(tmp_path / "led")):
        stats = led.query(target, known, batch_size=3, progress=False)
        assert stats["paid"] == 0 and stats["reused"] == len(clips)
    # A new clip id with known audio is an alias, not a payment.
    stats = Ledger(tmp_path / "led").query(target, [("e", lambda: w[3].copy())], progress=False)
    assert stats["paid"] == 0 and stats["reused"] == 1
    assert Ledger(tmp_path / "led").key_of("e") == content_key(w[3])
    assert len(target.calls) == 2 and sum(target.requests.values()) == 4


def test_clip_budget_is_never_exceeded(tmp_path):
    wavs = _wavs(14, seed=3)
    target = FakeTarget()
    ledger = Ledger(tmp_path / "led", Budget(clips=5))
    stats = ledger.query(target, _clips(wavs[:8]), batch_size=3, progress=False)
    assert stats["paid"] == 5 and stats["over_budget"] == 3
    assert ledger.spent_clips == 5
    # The first five are paid; the rest are skipped, not sent.
    assert set(target.requests) == {content_key(w) for w in wavs[:5]}

    stats = ledger.query(target, _clips(wavs[8:], prefix="n"), progress=False)
    assert stats["paid"] == 0 and stats["over_budget"] == 6

    reopened = Ledger(tmp_path / "led", Budget(clips=5))
    stats = reopened.query(target, _clips(wavs), progress=False)
    assert stats["paid"] == 0 and stats["reused"] == 5 and stats["over_budget"] == 9
    assert reopened.spent_clips == 5 and sum(target.requests.values()) == 5

    # A larger budget later admits exactly the difference.
    bigger = Ledger(tmp_path / "led", Budget(clips=7))
    stats = bigger.query(target, _clips(wavs), batch_size=4, progress=False)
    assert stats["paid"] == 2 and stats["over_budget"] == 7
    assert Ledger(tmp_path / "led").spent_clips == 7 and sum(target.requests.values()) == 7


def test_seconds_budget_is_never_exceeded(tmp_path):
    wavs = _wavs(16, seed=4)
    budget = 6.0
    target = FakeTarget()

    def expected(order, spent):
        """Greedy: a clip is paid iff it still fits, a clip that does not fit is skipped."""
        paid = []
        for w in order:
            if spent + len(w) / SR <= budget + 1e-9:
                spent += len(w) / SR
                paid.append(content_key(w))
        return paid, spent

    ledger = Ledger(tmp_path / "led", Budget(seconds=budget))
    first, spent = expected(wavs[:8], 0.0)
    stats = ledger.query(target, _clips(wavs[:8]), batch_size=3, progress=False)
    assert stats["paid"] == len(first) and stats["over_budget"] == 8 - len(first)
    assert 0 < len(first) < 8, "the test data should put the budget in play"
    assert set(ledger.keys()) == set(first)
    assert ledger.spent_seconds <= budget + 1e-9

    second, spent = expected(wavs[8:], spent)
    stats = ledger.query(target, _clips(wavs[8:], prefix="n"), batch_size=3, progress=False)
    assert stats["paid"] == len(second) and stats["over_budget"] == 8 - len(second)
    assert ledger.spent_seconds <= budget + 1e-9

    reopened = Ledger(tmp_path / "led", Budget(seconds=budget))
    assert reopened.spent_seconds == pytest.approx(spent)
    third, spent = expected([w for w in wavs if content_key(w) not in reopened.entries], spent)
    stats = reopened.query(target, _clips(wavs, prefix="r"), batch_size=5, progress=False)
    assert stats["paid"] == len(third)
    assert stats["reused"] + stats["over_budget"] + stats["paid"] == 16
    assert Ledger(tmp_path / "led").spent_seconds <= budget + 1e-9
    assert all(n == 1 for n in target.requests.values())
    assert set(target.requests) == set(Ledger(tmp_path / "led").keys())


def test_torn_last_line_is_cut_and_nothing_earlier_is_lost(tmp_path):
    root = tmp_path / "led"
    wavs = _wavs(8, seed=5)
    target = FakeTarget()
    Ledger(root).query(target, _clips(wavs[:5]), batch_size=2, progress=False)
    before = (root / "index.jsonl").read_bytes()
    with open(root / "index.jsonl", "ab") as f:  # a crash in the middle of an append
        f.write(b'{"clip_id": "c9", "event": "paid", "frames": {"a": 3')

    ledger = Ledger(root)
    assert (root / "index.jsonl").read_bytes() == before
    assert len(ledger) == 5 and ledger.in_doubt == set()
    for i, w in enumerate(wavs[:5]):
        _assert_response_equal(ledger.get_clip(f"c{i}"), _features(w))

    # The ledger keeps working: new clips are paid, old ones are not re-sent, the index parses.
    stats = ledger.query(target, _clips(wavs), batch_size=2, progress=False)
    assert stats["paid"] == 3 and stats["reused"] == 5
    assert all(n == 1 for n in target.requests.values())
    assert _paid_lines(root) == Counter({content_key(w): 1 for w in wavs})
    assert len(Ledger(root)) == 8


def test_orphan_blob_is_reindexed_on_open(tmp_path):
    root = tmp_path / "led"
    wavs = _wavs(4, seed=6)
    target = FakeTarget()
    Ledger(root).query(target, _clips(wavs), batch_size=2, progress=False)
    lines = (root / "index.jsonl").read_bytes().splitlines(keepends=True)
    last_paid = max(i for i, line in enumerate(lines) if json.loads(line)["event"] == "paid")
    lost = json.loads(lines[last_paid])
    assert lost["key"] == content_key(wavs[3])
    # The crash came after the blob's rename and before its "paid" line.
    (root / "index.jsonl").write_bytes(b"".join(lines[:last_paid] + lines[last_paid + 1 :]))

    ledger = Ledger(root)
    assert lost["key"] in ledger and len(ledger) == 4 and ledger.in_doubt == set()
    entry = ledger.entries[lost["key"]]
    assert (entry.clip_id, entry.num_samples, entry.frames) == ("c3", len(wavs[3]), lost["frames"])
    _assert_response_equal(ledger.get_clip("c3"), _features(wavs[3]))
    assert _paid_lines(root)[lost["key"]] == 1  # re-indexed once, durably

    stats = Ledger(root).query(target, _clips(wavs), progress=False)
    assert stats["paid"] == 0 and sum(target.requests.values()) == 4
    assert _paid_lines(root) == Counter({content_key(w): 1 for w in wavs})


def test_torn_paid_line_with_blob_on_disk_is_recovered(tmp_path):
    root = tmp_path / "led"
    wavs = _wavs(3, seed=7)
    Ledger(root).query(FakeTarget(), _clips(wavs), progress=False)
    raw = (root / "index.jsonl").read_bytes()
    (root / "index.jsonl").write_bytes(raw[:-20])  # the last "paid" line was torn
    ledger = Ledger(root)
    assert len(ledger) == 3 and ledger.in_doubt == set()
    assert _paid_lines(root) == Counter({content_key(w): 1 for w in wavs})
    _assert_response_equal(ledger.get_clip("c2"), _features(wavs[2]))


def test_sent_but_unpaid_keys_are_in_doubt_and_resent_exactly(tmp_path):
    root = tmp_path / "led"
    wavs = _wavs(8, seed=8)
    crashing = FakeTarget(fail_on_call=2)
    with pytest.raises(ConnectionError):
        Ledger(root).query(crashing, _clips(wavs), batch_size=4, progress=False)
    doubtful = set(crashing.calls[1])
    assert doubtful == {content_key(w) for w in wavs[4:]}

    ledger = Ledger(root)
    assert ledger.in_doubt == doubtful
    assert set(ledger.keys()) == {content_key(w) for w in wavs[:4]}
    assert ledger.summary()["in_doubt"] == 4

    target = FakeTarget()
    stats = ledger.query(target, _clips(wavs), batch_size=4, progress=False)
    assert stats["paid"] == 4 and stats["reused"] == 4
    assert target.requests == Counter(dict.fromkeys(doubtful, 1))  # exactly the in-doubt keys, once
    # They are re-sent with the same idempotency keys as the first time.
    assert target.idem_keys == crashing.idem_keys[1:] == [crashing.calls[1]]
    assert ledger.in_doubt == set() and Ledger(root).in_doubt == set()
    for i, w in enumerate(wavs):
        _assert_response_equal(ledger.get_clip(f"c{i}"), _features(w))


def test_target_without_keys_argument_is_called_without_keys(tmp_path):
    class NoKeys(FakeTarget):
        def __call__(self, wavs):
            return super().__call__(wavs)

    target = NoKeys()
    wavs = _wavs(3, seed=9)
    stats = Ledger(tmp_path / "led").query(target, _clips(wavs), progress=False)
    assert stats["paid"] == 3 and target.idem_keys == [None]


def test_binding_to_another_target_raises(tmp_path):
    root = tmp_path / "led"
    wavs = _wavs(3, seed=10)
    Ledger(root).query(FakeTarget(), _clips(wavs), progress=False)
    others = [FakeTarget(spec="fake:other"), FakeTarget(layers=("a", "c")), FakeTarget(layers=("b", "a"))]
    for other in others:
        with pytest.raises(ValueError, match="holds responses of"):
            Ledger(root).query(other, _clips(_wavs(2, seed=11), prefix="x"), progress=False)
        with pytest.raises(ValueError):
            Ledger(root).bind(other)
        assert other.calls == []  # refused before anything was sent
    # The same target binds again fine, and nothing was changed.
    same = FakeTarget()
    assert Ledger(root).query(same, _clips(wavs), progress=False)["paid"] == 0
    assert json.loads((root / "ledger.json").read_text())["layers"] == ["a", "b"]


def test_layer_stats_match_numpy(tmp_path):
    wavs = _wavs(6, seed=12)
    ledger = Ledger(tmp_path / "led", store="float32")  # the statistics of the answers as computed
    ledger.query(FakeTarget(), _clips(wavs), batch_size=4, progress=False)

    def check(stats, subset):
        assert sorted(stats) == ["a", "b"]
        for name in ("a", "b"):
            frames = np.concatenate([_features(w)[name] for w in subset]).astype(np.float64)
            mean, std = stats[name]
            assert mean.shape == std.shape == (frames.shape[1],)
            np.testing.assert_allclose(mean, frames.mean(0), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(std, frames.std(0), rtol=1e-4, atol=1e-7)

    check(ledger.layer_stats(), wavs)
    check(ledger.layer_stats([content_key(w) for w in wavs[1:3]]), wavs[1:3])


# -- SIGKILL: a query process killed mid-run, then resumed, with no paid query lost or paid twice ------
DEADLINE = 60.0


def _start(led: Path, state: Path, n: int, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(BILLING_SCRIPT), "--ledger", str(led), "--state", str(state)]
    cmd += ["--num-clips", str(n), "--batch-size", "4", *extra]
    with open(log, "ab") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)


def _wait_for(cond, what: str, proc: subprocess.Popen, log: Path, timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            rc = proc.returncode
            pytest.fail(f"query process exited ({rc}) while waiting for {what}:\n{log.read_text()}")
        if time.monotonic() > end:
            proc.kill()
            proc.wait()
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{log.read_text()}")
        time.sleep(0.005)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"query process did not finish within {DEADLINE:.0f} s:\n{log.read_text()}")
    assert rc == 0, f"query process failed ({rc}):\n{log.read_text()}"


def _sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=DEADLINE) == -signal.SIGKILL, "the process had already finished"


def _index_lines(led: Path) -> int:
    path = led / "index.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _assert_complete(led: Path, n: int) -> Ledger:
    ledger = Ledger(led)  # reopens cleanly
    assert ledger.in_doubt == set()
    distinct = {content_key(billing.make_wav(i)) for i in range(n)}
    assert set(ledger.keys()) == distinct
    for i in range(n):
        wav = billing.make_wav(i)
        assert ledger.key_of(billing.clip_id(i)) == content_key(wav)
        _assert_response_equal(ledger.get_clip(billing.clip_id(i)), billing.respond(wav))
    assert _paid_lines(led) == Counter(dict.fromkeys(distinct, 1))
    return ledger


def test_sigkill_at_random_moments_loses_nothing_and_pays_nothing_twice(tmp_path):
    n, batch, kills = 150, 4, 5
    led, state, log = tmp_path / "ledger", tmp_path / "server", tmp_path / "stderr.log"
    rng = random.Random(20240601)
    for k in range(kills):
        proc = _start(led, state, n, log)
        grown = _index_lines(led) + rng.randint(2, 20)
        _wait_for(lambda g=grown: _index_lines(led) >= g, f"progress before kill {k + 1}", proc, log)
        time.sleep(rng.uniform(0.0, 0.06))
        _sigkill(proc)
    assert len(Ledger(led)) < n - 20, "the kills should all have landed before the end"
    proc = _start(led, state, n, log)
    _finish(proc, log)

    ledger = _assert_complete(led, n)
    charges = billing.read_charges(state)
    assert charges, "the billing target was never charged"
    paid_twice = {k: c for k, c in charges.items() if c > 1}
    assert not paid_twice, f"charged more than once: {paid_twice}"
    assert set(charges) == set(ledger.keys()), "a charged response is missing from the ledger"
    requested = Counter(k for r in billing.read_requests(state) for k in r["keys"])
    resent = sum(requested.values()) - len(requested)
    assert resent <= kills * batch, f"{resent} keys re-sent after {kills} kills"
    assert set(requested) == set(ledger.keys())


def test_sigkill_with_request_in_flight_resends_only_that_batch(tmp_path):
    n, hang_at = 40, 4
    led, state, log = tmp_path / "ledger", tmp_path / "server", tmp_path / "stderr.log"
    proc = _start(led, state, n, log, "--plain", "--hang-at", str(hang_at), "--latency", "0.01")
    marker = state / "calls" / f"call-{hang_at:04d}"
    _wait_for(marker.exists, f"call {hang_at} to start", proc, log)
    _sigkill(proc)

    requests = billing.read_requests(state)
    assert [r["call"] for r in requests] == list(range(1, hang_at + 1))
    in_flight = set(requests[-1]["keys"])
    on_disk = {blob.stem for blob in (led / "blobs").glob("*/*.safetensors")}
    assert len(in_flight) == 4 and not in_flight & on_disk
    assert on_disk == {k for r in requests[:-1] for k in r["keys"]}
    assert Ledger(led).in_doubt == in_flight

    _finish(_start(led, state, n, log, "--plain", "--latency", "0.01"), log)
    _assert_complete(led, n)
    requested = Counter(k for r in billing.read_requests(state) for k in r["keys"])
    assert {k: requested[k] for k in on_disk} == dict.fromkeys(on_disk, 1), "a paid clip was asked again"
    assert {k: requested[k] for k in in_flight} == dict.fromkeys(in_flight, 2)
    assert all(c == 1 for k, c in requested.items() if k not in in_flight)


def test_unusable_clip_is_listed_and_stops_nothing(tmp_path):
    from speechmimic.audio import TooShortAudioError

    def too_short():
        raise TooShortAudioError("short.wav", "10 samples, fewer than the 400 required")

    wavs = _wavs(3)
    ledger = Ledger(tmp_path / "ledger")
    clips = [("a", lambda: wavs[0]), ("short", too_short), ("b", lambda: wavs[1])]
    stats = ledger.query(FakeTarget(), clips, batch_size=2, progress=False)
    assert stats["paid"] == 2 and stats["unusable"] == [("short", "10 samples, fewer than the 400 required")]
    assert ledger.key_of("short") is None and len(ledger) == 2


# -- several writers, and damage on disk -------------------------------------------------------------
@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_query_runs_pay_every_clip_exactly_once(tmp_path, writers):
    n = 40
    led, state = tmp_path / "ledger", tmp_path / "server"
    logs = [tmp_path / f"stderr-{i}.log" for i in range(writers)]
    # A plain API charges every request: any clip sent twice would be charged twice.
    together = ("--barrier", str(tmp_path / "barrier"), "--parties", str(writers))
    procs = [_start(led, state, n, log, "--plain", "--latency", "0.05", *together) for log in logs]
    for proc, log in zip(procs, logs, strict=True):
        _finish(proc, log)  # every run exits 0: none crashed
    _assert_complete(led, n)
    requested = Counter(k for r in billing.read_requests(state) for k in r["keys"])
    distinct = {content_key(billing.make_wav(i)) for i in range(n)}
    assert requested == Counter(dict.fromkeys(distinct, 1)), "a clip was sent (and charged) twice"
    waited = [log for log in logs if "is being written by pid" in log.read_text()]
    assert waited, "the runs did not overlap: the test proved nothing"
    assert not list((led / "blobs").glob("*/*.tmp"))


def test_a_waiting_writer_names_the_holder_even_at_the_instant_it_took_the_lock(tmp_path):
    import threading

    from speechmimic import ledger as ledger_mod

    lock = tmp_path / "writer.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, json.dumps({"pid": 1, "command": "x" * 300, "clean": True}).encode(), 0)
        ledger_mod._write_holder(fd, clean=False)  # a shorter record over a longer one
        assert json.loads(lock.read_bytes())["pid"] == os.getpid()
        os.ftruncate(fd, 0)  # the holder has the lock and has not written its record yet
        threading.Timer(0.05, ledger_mod._write_holder, (fd, False)).start()
        assert ledger_mod._holder(fd).startswith(f"pid {os.getpid()} ")
    finally:
        os.close(fd)


def test_concurrent_writers_never_overspend_a_lifetime_budget(tmp_path):
    n, budget = 40, 25
    led, state = tmp_path / "ledger", tmp_path / "server"
    logs = [tmp_path / f"stderr-{i}.log" for i in range(3)]
    together = ("--barrier", str(tmp_path / "barrier"), "--parties", str(len(logs)))
    cap = ("--budget-clips", str(budget))
    procs = [_start(led, state, n, log, "--plain", "--latency", "0.03", *cap, *together) for log in logs]
    for proc, log in zip(procs, logs, strict=True):
        _finish(proc, log)
    requested = Counter(k for r in billing.read_requests(state) for k in r["keys"])
    assert sum(requested.values()) == len(requested) == budget  # each paid once, and no more than allowed
    assert Ledger(led).spent_clips == budget and sum(_paid_lines(led).values()) == budget


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    import fcntl

    n, hang_at = 20, 2
    led, state, log = tmp_path / "ledger", tmp_path / "server", tmp_path / "stderr.log"
    proc = _start(led, state, n, log, "--plain", "--hang-at", str(hang_at), "--latency", "0.01")
    _wait_for((state / "calls" / f"call-{hang_at:04d}").exists, "the hanging call", proc, log)

    def lock_is_free() -> bool:
        fd = os.open(led / "writer.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    assert not lock_is_free()
    holder = json.loads((led / "writer.lock").read_text())
    assert holder["pid"] == proc.pid and holder["clean"] is False
    _sigkill(proc)
    assert lock_is_free()  # the OS released it with the process
    _finish(_start(led, state, n, log, "--plain", "--latency", "0.01"), log)
    _assert_complete(led, n)
    assert json.loads((led / "writer.lock").read_text())["clean"] is True


def _flip(path: Path, offset_from_end: int = 9) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0xFF  # inside the last array's bytes
    path.write_bytes(bytes(raw))


def test_a_damaged_answer_is_refused_named_and_bought_again(tmp_path):
    from speechmimic.ledger import DamagedAnswerError

    wavs = _wavs(5, seed=13)
    root = tmp_path / "led"
    target = FakeTarget()
    ledger = Ledger(root)
    ledger.query(target, _clips(wavs), progress=False)
    key = content_key(wavs[2])
    _flip(ledger._blob_path(key))
    again = Ledger(root)
    with pytest.raises(DamagedAnswerError, match=r"clip 'c2'.*no longer match the digest") as err:
        again.get_clip("c2")
    assert err.value.clip_id == "c2" and err.value.key == key
    _assert_response_equal(again.get_clip("c3"), _features(wavs[3]))  # the others are intact
    report = again.verify()
    assert report.checked == 5 and [k for _, k, _ in report.damaged] == [key] and not report.ok
    # A header flipped so the file no longer parses, and a file gone, are damage too.
    other = content_key(wavs[4])
    raw = bytearray(again._blob_path(other).read_bytes())
    raw[12] ^= 0xFF
    again._blob_path(other).write_bytes(bytes(raw))
    again._blob_path(content_key(wavs[0])).unlink()
    report = Ledger(root).verify()
    assert sorted(k for _, k, _ in report.damaged) == sorted([key, other])
    assert [k for _, k, _ in report.missing] == [content_key(wavs[0])]

    # Repair drops exactly those and the next query buys exactly those; spending counts them twice.
    assert sorted(again.repair()) == sorted([key, other, content_key(wavs[0])])
    assert (root / "damaged").is_dir() and len(list((root / "damaged").iterdir())) == 2
    stats = Ledger(root).query(target, _clips(wavs), progress=False)
    assert stats["paid"] == 3 and stats["reused"] == 2
    assert target.requests[key] == 2 and target.requests[content_key(wavs[1])] == 1
    healed = Ledger(root)
    assert healed.verify().ok and healed.spent_clips == 8 and len(healed) == 5
    _assert_response_equal(healed.get_clip("c2"), _features(wavs[2]))


def test_ledger_commands_and_query_repair(tmp_path, speech_clips, capsys):
    from speechmimic.cli import main
    from speechmimic.corpus import write_manifest

    pool, _ = speech_clips
    manifest = tmp_path / "m.jsonl"
    write_manifest(pool[:4], manifest)
    led = tmp_path / "led"
    query = ["query", "--target", "resemblyzer?layers=2", "--manifest", str(manifest), "--ledger", str(led)]
    assert main([*query, "--no-progress"]) == 0
    ledger = Ledger(led)
    damaged = ledger.key_of(pool[1].id)
    original = ledger.get(damaged)
    _flip(ledger._blob_path(damaged))
    capsys.readouterr()
    assert main(["ledger", "verify", str(led), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"damaged: clip {pool[1].id} (key {damaged})" in out and "checked 4 answers: 1 damaged" in out

    assert main([*query, "--repair", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 damaged or missing, bought again" in out
    assert json.loads(out[out.index("{") :])["paid"] == 1  # only that clip
    assert _paid_lines(led) == Counter({**dict.fromkeys(Ledger(led).keys(), 1), damaged: 2})
    np.testing.assert_array_equal(Ledger(led).get(damaged)["lstm2"], original["lstm2"])
    assert main(["ledger", "verify", str(led), "--no-progress"]) == 0
    capsys.readouterr()

    assert main(["ledger", "stats", str(led)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["answers"] == 4 and stats["payments"] == 5 and stats["dropped"] == 1
    assert stats["target"] == "resemblyzer?layers=2" and stats["bytes"] > 0
    assert stats["first_payment"] <= stats["last_payment"]
    assert main(["ledger", "stats", str(tmp_path / "nothing")]) == 2
    assert not (tmp_path / "nothing").exists()  # a mistyped path is refused, not created


def test_answers_are_stored_as_float16_unless_asked(tmp_path):
    wavs = _wavs(4, seed=3)
    sizes = {}
    for store in ("float16", "float32"):
        ledger = Ledger(tmp_path / store, store=None if store == "float16" else store)
        ledger.query(FakeTarget(), _clips(wavs), progress=False)
        assert ledger.store == store == json.loads((tmp_path / store / "ledger.json").read_text())["store"]
        for w in wavs:
            _assert_response_equal(ledger.get(content_key(w)), _features(w), store)
            assert {a.dtype for a in ledger.get(content_key(w), dtype=None).values()} == {np.dtype(store)}
        sizes[store] = sum(a.nbytes for w in wavs for a in ledger.get(content_key(w), dtype=None).values())
        assert Ledger(tmp_path / store).verify().ok  # digests are of the stored bytes
    assert sizes["float16"] * 2 == sizes["float32"]
    # the choice is the ledger's for life
    with pytest.raises(LedgerError, match="stores its answers as float16"):
        Ledger(tmp_path / "float16", store="float32").query(FakeTarget(), _clips(_wavs(1, 9)), progress=False)


def test_an_answer_beyond_float16s_range_stays_float32(tmp_path):
    class Loud(FakeTarget):
        def __call__(self, wavs, keys=None):
            return [{k: v * 1e6 for k, v in a.items()} for a in super().__call__(wavs, keys)]

    wav = _wavs(1, seed=5)[0]
    ledger = Ledger(tmp_path / "led")
    ledger.query(Loud(), _clips([wav]), progress=False)
    stored = ledger.get(content_key(wav), dtype=None)
    assert {a.dtype for a in stored.values()} == {np.dtype(np.float32)}
    assert all(np.isfinite(a).all() for a in stored.values())


def test_a_ledger_from_before_the_choice_reads_as_float32(tmp_path):
    wav = _wavs(1, seed=6)[0]
    Ledger(tmp_path / "led", store="float32").query(FakeTarget(), _clips([wav]), progress=False)
    header = json.loads((tmp_path / "led" / "ledger.json").read_text())
    del header["store"]
    (tmp_path / "led" / "ledger.json").write_text(json.dumps(header))
    old = Ledger(tmp_path / "led")
    assert old.store == "float32"
    _assert_response_equal(old.get(content_key(wav)), _features(wav), "float32")
    more = _wavs(2, seed=7)
    old.query(FakeTarget(), _clips(more), progress=False)  # it goes on storing float32
    _assert_response_equal(old.get(content_key(more[1])), _features(more[1]), "float32")


# -- shards: several workers, one ledger each, merged -----------------------------------------------
def _sharded(tmp_path, wavs, n):
    """Query ``wavs`` (ids c0.., and d0.. naming the first three again) in ``n`` shards, one shared
    target counting what reaches it."""
    target = FakeTarget()
    clips = _clips(wavs) + _clips(wavs[:3], prefix="d")
    shards = []
    for i in range(n):
        shard = Ledger(tmp_path / f"shard{i}")
        stats = shard.query(target, clips, batch_size=4, progress=False, shard=(i, n))
        assert stats["paid"] + stats["reused"] + stats["other_shards"] == len(clips)
        shards.append(shard)
    return target, shards


def test_shards_split_by_content_and_merge_without_loss_or_double_payment(tmp_path):
    wavs = _wavs(30, seed=11)
    target, shards = _sharded(tmp_path, wavs, 3)
    assert all(v == 1 for v in target.requests.values()) and len(target.requests) == 30
    keys = [set(s.keys()) for s in shards]
    assert all(keys) and sum(len(k) for k in keys) == 30 and set.union(*keys) == set(target.requests)

    merged = Ledger(tmp_path / "merged")
    results = [merged.merge(s, progress=False) for s in shards]
    assert sum(r["merged"] for r in results) == 30 and not any(
        r["paid_twice"] or r["damaged"] for r in results
    )
    assert merged.spent_clips == len(merged) == 30 and merged.header["target"] == "fake:test"
    for prefix, ws in (("c", wavs), ("d", wavs[:3])):  # every name of every clip, answered once
        for i, w in enumerate(ws):
            _assert_response_equal(merged.get_clip(f"{prefix}{i}"), _features(w))
    assert merged.verify().ok and _paid_lines(tmp_path / "merged") == Counter(
        dict.fromkeys(target.requests, 1)
    )

    again = [merged.merge(s, progress=False) for s in shards]  # a rerun copies nothing, pays nothing
    assert sum(r["already_here"] for r in again) == 30 and not any(r["merged"] for r in again)
    reopened = Ledger(tmp_path / "merged")
    assert reopened.spent_clips == 30 and reopened.spent_seconds == pytest.approx(
        sum(len(w) for w in wavs) / SR
    )


def test_a_killed_merge_resumes_and_loses_nothing(tmp_path, monkeypatch):
    wavs = _wavs(12, seed=12)
    _, shards = _sharded(tmp_path, wavs, 2)
    real_append, paid = Ledger._append, []

    def dies_at_the_seventh_paid_line(self, event):
        if event["event"] == "paid":
            paid.append(event["key"])
            if len(paid) == 7:
                raise KeyboardInterrupt  # after the blob's rename, before its paid line
        real_append(self, event)

    monkeypatch.setattr(Ledger, "_append", dies_at_the_seventh_paid_line)
    merged = Ledger(tmp_path / "merged")
    with pytest.raises(KeyboardInterrupt):
        for shard in shards:
            merged.merge(shard, progress=False)
    monkeypatch.setattr(Ledger, "_append", real_append)
    resumed = Ledger(tmp_path / "merged")  # the seventh answer's blob is found and indexed
    assert len(resumed) == 7
    for shard in shards:
        resumed.merge(shard, progress=False)
    assert len(resumed) == resumed.spent_clips == 12 and resumed.verify().ok
    assert _paid_lines(tmp_path / "merged") == Counter(dict.fromkeys(resumed.keys(), 1))


def test_merging_answers_paid_twice_keeps_one_and_counts_both(tmp_path):
    wavs = _wavs(8, seed=13)
    a, b = Ledger(tmp_path / "a"), Ledger(tmp_path / "b")
    a.query(FakeTarget(), _clips(wavs[:5]), progress=False)
    b.query(FakeTarget(), _clips(wavs[3:], prefix="b"), progress=False)  # wavs 3 and 4 paid by both
    merged = Ledger(tmp_path / "merged")
    merged.merge(a, progress=False)
    result = merged.merge(b, progress=False)
    assert result["merged"] == 3 and result["paid_twice"] == 2
    assert len(merged) == 8 and merged.spent_clips == 10
    assert merged.merge(b, progress=False)["paid_twice"] == 0  # a rerun does not charge again
    reopened = Ledger(tmp_path / "merged")
    assert reopened.spent_clips == 10
    want = sum(len(w) for w in wavs) + len(wavs[3]) + len(wavs[4])
    assert reopened.spent_samples == want


def test_merge_refuses_another_targets_answers(tmp_path):
    wavs = _wavs(2, seed=14)
    Ledger(tmp_path / "a").query(FakeTarget(), _clips(wavs), progress=False)
    Ledger(tmp_path / "b").query(FakeTarget(spec="fake:other"), _clips(wavs), progress=False)
    merged = Ledger(tmp_path / "merged")
    merged.merge(Ledger(tmp_path / "a"), progress=False)
    with pytest.raises(LedgerError, match="its target is 'fake:other', not 'fake:test'"):
        merged.merge(Ledger(tmp_path / "b"), progress=False)
    assert len(Ledger(tmp_path / "merged")) == 2


def test_query_shard_and_ledger_merge_commands(tmp_path, speech_clips, capsys):
    from speechmimic.cli import main
    from speechmimic.corpus import write_manifest

    pool, _ = speech_clips
    manifest = tmp_path / "m.jsonl"
    write_manifest(pool[:6], manifest)
    query = ["query", "--target", "resemblyzer?layers=2", "--manifest", str(manifest), "--no-progress"]
    for i in range(2):
        assert main([*query, "--ledger", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"]) == 0
    capsys.readouterr()
    shards = [str(tmp_path / f"s{i}") for i in range(2)]
    assert main(["ledger", "merge", *shards, "--into", str(tmp_path / "all"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'all'}: 6 answers, 6 payments" in out
    assert all(Ledger(tmp_path / "all").key_of(c.id) for c in pool[:6])
    with pytest.raises(SystemExit):
        main([*query, "--ledger", str(tmp_path / "x"), "--shard", "2/2"])
    assert "expected I/N with 0 <= I < N" in capsys.readouterr().err
