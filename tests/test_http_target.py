"""The attack over the wire: ``http://`` targets paying through the ledger against a real server on
loopback, including SIGKILLs of either side mid-attack. The server's accounting and the ledger's must
agree to the sample."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from speechmimic.budget import Budget
from speechmimic.corpus import write_manifest
from speechmimic.ledger import Ledger, query_clips
from speechmimic.serve.process import ServerProcess as Server
from speechmimic.targets import load_backend
from speechmimic.targets.base import TargetError

DEADLINE = 180.0


@pytest.fixture(scope="module")
def spec(tiny_hf):
    return f"hf:{tiny_hf['hubert']}?layers=all"


def http_spec(server: Server, env: str, **options) -> str:
    opts = "&".join([f"key_env={env}", *(f"{k}={v}" for k, v in options.items())])
    return f"{server.url}?{opts}"


def test_a_budgeted_attack_through_http_is_charged_exactly_what_the_ledger_paid(
    tmp_path, spec, speech_clips, monkeypatch
):
    pool = speech_clips[0]
    with Server(tmp_path / "server", spec) as server:
        monkeypatch.setenv("THIEF_KEY", server.key("thief"))
        target = load_backend(http_spec(server, "THIEF_KEY", concurrency=4))
        assert target.layers == load_backend(spec).layers and target.frame_rate == 50.0
        ledger = Ledger(tmp_path / "ledger", Budget(clips=20), store="float32")  # the wire, unrounded
        stats = query_clips(target, pool, ledger, progress=False)
        assert stats["paid"] == 20 and stats["over_budget"] == len(pool) - 20
        used = server.usage("thief")
        assert (used.requests, used.samples) == (20, ledger.spent_samples)
        # the answers are the in-process answers, bit for bit (raw float32 on the wire)
        local = load_backend(spec)
        for clip in pool[:3]:
            got, want = ledger.get_clip(clip.id), local([clip.load()])[0]
            assert all(np.array_equal(got[k], want[k]) for k in want)
        # a rerun pays nothing and sends nothing
        again = query_clips(target, pool, Ledger(tmp_path / "ledger", Budget(clips=20)), progress=False)
        assert again["paid"] == 0 and server.usage("thief").requests == 20


def test_an_api_that_hides_what_it_returns_is_learned_from_its_answers(
    tmp_path, spec, speech_clips, monkeypatch
):
    pool = speech_clips[0][:10]
    with Server(tmp_path / "server", spec, "--hide-info", "all") as server:
        monkeypatch.setenv("THIEF_KEY", server.key("thief"))
        target = load_backend(http_spec(server, "THIEF_KEY"))
        assert target.layers is None and target.frame_rate is None and target.min_samples == 0
        ledger = Ledger(tmp_path / "ledger")
        too_short = dataclasses.replace(pool[0], id="too-short", offset=0.5, duration=0.01)
        stats = query_clips(target, [too_short, *pool], ledger, progress=False)
        assert stats["paid"] == 10 and stats["in_doubt"] == 0
        assert stats["unusable"] == [("too-short", stats["unusable"][0][1])]
        assert "the API refuses the clip: 422" in stats["unusable"][0][1]
        assert ledger.header["layers"] == load_backend(spec).layers  # the target's order, from the answers
        assert ledger.header["frame_rate"] is None
        assert all(abs(r - 50.0) < 0.5 for r in ledger.frame_rates().values())
        assert server.usage("thief").requests == 10  # the refused clip was not charged


def test_rate_limits_are_waited_out_and_a_spent_quota_ends_the_run_with_what_was_paid(
    tmp_path, spec, speech_clips, monkeypatch
):
    pool = speech_clips[0][:12]
    with Server(tmp_path / "server", spec) as server:
        monkeypatch.setenv("SLOW_KEY", server.key("slow", rate=4, burst=1))
        t = time.monotonic()
        ledger = Ledger(tmp_path / "slow")
        stats = query_clips(
            load_backend(http_spec(server, "SLOW_KEY", concurrency=4)), pool[:8], ledger, progress=False
        )
        assert stats["paid"] == 8 and time.monotonic() - t > 7 / 4 * 0.9  # it waited, it did not fail
        assert server.usage("slow").requests == 8

        monkeypatch.setenv("POOR_KEY", server.key("poor", quota_requests=5))
        ledger = Ledger(tmp_path / "poor")
        poor = load_backend(http_spec(server, "POOR_KEY", concurrency=3))
        with pytest.raises(TargetError, match="quota spent"):
            query_clips(poor, pool, ledger, batch_size=4, progress=False)
        ledger = Ledger(tmp_path / "poor")
        charged = server.usage("poor").requests
        assert (len(ledger), charged) == (5, 5), (len(ledger), charged)  # every answer charged is kept

        # waiting out rate limits is bounded per clip: past the bound the run ends, resumable
        monkeypatch.setattr("speechmimic.targets.http.MAX_RETRY_AFTER", 1.5)
        monkeypatch.setenv("PATIENT_KEY", server.key("patient", rate=1, burst=1))
        with pytest.raises(TargetError, match=r"asks to wait 1 s more .* after 1 s; rerun later"):
            # 3 clips at once, 1 token a second: one clip is told to wait twice
            query_clips(load_backend(http_spec(server, "PATIENT_KEY", concurrency=3)), pool[:3],
                        Ledger(tmp_path / "patient"), batch_size=3, progress=False)  # fmt: skip


def _query(tmp_path, url_spec: str, manifest, ledger, env, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "speechmimic", "query", "--target", url_spec, "--manifest", str(manifest),
           "--ledger", str(ledger), "--no-progress", *extra]  # fmt: skip
    log = open(tmp_path / f"query-{time.monotonic_ns()}.log", "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})


def _index(ledger_dir) -> list[dict]:
    index = ledger_dir / "index.jsonl"
    lines = index.read_bytes().split(b"\n")[:-1] if index.exists() else []  # complete lines only
    return [json.loads(line) for line in lines]


def _wait_sending(ledger_dir, n: int, proc: subprocess.Popen) -> None:
    """Until ``n`` answers are paid and a batch has been sent and not yet answered."""
    deadline = time.monotonic() + DEADLINE
    while True:
        events = _index(ledger_dir)
        if sum(e["event"] == "paid" for e in events) >= n and events[-1]["event"] == "send":
            return
        assert proc.poll() is None, f"query ended early with {proc.returncode}"
        assert time.monotonic() < deadline, "the query made no progress"
        time.sleep(0.005)


def test_server_sigkilled_and_restarted_mid_attack_charges_exactly_what_the_ledger_paid(
    tmp_path, spec, speech_clips
):
    pool = speech_clips[0]
    manifest = tmp_path / "pool.jsonl"
    write_manifest(pool, manifest)
    # every request waits 150 ms for company, so the attack lasts long enough to be cut
    server = Server(tmp_path / "server", spec, "--max-delay-ms", "150").start()
    try:
        env = {"THIEF_KEY": server.key("thief")}
        proc = _query(
            tmp_path, http_spec(server, "THIEF_KEY", concurrency=2), manifest, tmp_path / "ledger", env
        )
        _wait_sending(tmp_path / "ledger", 10, proc)
        server.kill()  # SIGKILL, with requests in flight
        time.sleep(1.0)
        server.start()  # same port, same database; the client's retries carry the attack on
        assert proc.wait(timeout=DEADLINE) == 0
        ledger = Ledger(tmp_path / "ledger")
        assert len(ledger) == len(pool) and not ledger.in_doubt
        used = server.usage("thief")
        assert used.samples == ledger.spent_samples and used.requests == ledger.spent_clips == len(pool)
    finally:
        server.kill()


def test_client_sigkilled_mid_attack_then_resumed_is_never_charged_twice(tmp_path, spec, speech_clips):
    pool = speech_clips[0]
    manifest = tmp_path / "pool.jsonl"
    write_manifest(pool, manifest)
    with Server(tmp_path / "server", spec, "--max-delay-ms", "150") as server:
        env = {"THIEF_KEY": server.key("thief")}
        url_spec = http_spec(server, "THIEF_KEY", concurrency=4)
        proc = _query(tmp_path, url_spec, manifest, tmp_path / "ledger", env)
        _wait_sending(tmp_path / "ledger", 12, proc)
        proc.kill()
        proc.wait()
        in_doubt = len(Ledger(tmp_path / "ledger").in_doubt)
        assert proc.returncode == -9
        resumed = _query(tmp_path, url_spec, manifest, tmp_path / "ledger", env)
        assert resumed.wait(timeout=DEADLINE) == 0
        ledger = Ledger(tmp_path / "ledger")
        used = server.usage("thief")
        assert (
            len(ledger) == len(pool) and used.requests == len(pool) and used.samples == ledger.spent_samples
        )
        metrics = server.metrics()
        replays = [ln for ln in metrics.splitlines() if ln.startswith("speechmimic_idempotent_replays_total")]
        replayed = float(replays[0].split()[-1]) if replays else 0.0
        # the kill left clips in doubt; those the server had answered came back free on the resend
        assert in_doubt > 0 and 0 <= replayed <= in_doubt
        print(f"in doubt after the kill: {in_doubt}, answered again free: {replayed:g}")
