"""2 CPU processes (gloo, loopback only) take the steps one process takes, and a run killed mid-way
resumes to the same end, under the same or another number of processes. The ranks are started as
torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK), the same commands, with a file store for the
rendezvous instead of torchrun's TCP store, which listens on every interface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speechmimic.corpus import write_manifest
from speechmimic.ledger import Ledger, query_clips
from speechmimic.targets import load_backend
from speechmimic.tasks import write_task

HERE = Path(__file__).parent
STEPS = 12
# Loss logs are rounded to 5 decimals; weights after 12 AdamW steps agree to float32 rounding: the
# ranks' halves of a batch go through GEMMs of other shapes than the whole batch does.
LOSS_TOLERANCE = 2e-5
WEIGHT_TOLERANCE = 1e-4


def torchrun(nproc: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``nproc`` ranks, as torchrun starts them, but with a file store for the
    rendezvous (torchrun's TCP store listens on every interface; this test opens sockets on loopback
    only: gloo on ``lo``). As torchrun does, the others are stopped when a rank fails."""
    with tempfile.TemporaryDirectory(prefix="ddp-store-") as folder:
        return _ranks(nproc, args, Path(folder) / "store", check)


def _ranks(nproc: int, args: tuple[str, ...], store: Path, check: bool) -> subprocess.CompletedProcess:
    # one thread per process in every run compared, so reductions are computed alike
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(nproc)}
    env["SPEECHMIMIC_DIST_INIT"] = f"file://{store}"
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(nproc)
    ]
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
        time.sleep(0.05)
    outs = [p.communicate() for p in procs]
    rc = next((p.returncode for p in procs if p.returncode != 0), 0)
    proc = subprocess.CompletedProcess(args, rc, "".join(o for o, _ in outs), "".join(e for _, e in outs))
    if check and rc != 0:
        raise AssertionError(f"{' '.join(args)} failed ({rc}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def queried(tmp_path_factory, speech_clips):
    pool, _ = speech_clips
    root = tmp_path_factory.mktemp("ddp")
    clips = pool[:12] + pool[-12:]  # sentences and keywords: batches of several lengths
    write_manifest(clips, root / "m.jsonl")
    query_clips(load_backend("resemblyzer?layers=all"), clips, Ledger(root / "ledger"), progress=False)
    return root


def distill_cmd(root: Path, out: str) -> list[str]:
    return [
        "-m", "speechmimic", "distill", "--manifest", str(root / "m.jsonl"), "--ledger", str(root / "ledger"),
        "--out", str(root / out), "--steps", str(STEPS), "--warmup", "2", "--preset", "tiny",
        "--batch-seconds", "8", "--checkpoint-every", "5", "--no-progress",
    ]  # fmt: skip


def losses(directory: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (directory / "train_log.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, exact: bool = False) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == STEPS
    worst = max(abs(x - y) / abs(x) for x, y in zip(la, lb, strict=True))
    assert worst <= (0.0 if exact else LOSS_TOLERANCE), (la, lb)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff <= (0.0 if exact else WEIGHT_TOLERANCE), diff


def test_two_processes_take_the_steps_of_one(queried):
    torchrun(1, *distill_cmd(queried, "one"))
    two = torchrun(2, *distill_cmd(queried, "two"))
    assert two.stdout.count("student (") == 1  # rank 0 speaks for both
    assert_same_run(queried / "one", queried / "two")
    state = torch.load(queried / "two" / "train_state.pt", weights_only=False)
    assert state["step"] == STEPS


def test_a_killed_ddp_run_resumes_to_the_same_end(queried):
    root = queried
    if not (root / "two" / "train_log.jsonl").exists():
        torchrun(2, *distill_cmd(root, "two"))
    for resume_with in (2, 1):
        out = f"killed-{resume_with}"
        died = torchrun(
            2, str(HERE / "_ddp_distill.py"), str(root / "m.jsonl"), str(root / "ledger"), str(root / out),
            str(STEPS), "7", check=False,
        )  # fmt: skip
        assert died.returncode != 0 and not (root / out / "model.safetensors").exists()
        assert torch.load(root / out / "train_state.pt", weights_only=False)["step"] == 5
        torchrun(resume_with, *distill_cmd(root, out))
        # the same world size replays the run exactly; another one continues it to float rounding
        assert_same_run(root / "two", root / out, exact=resume_with == 2)


def test_probe_ranks_share_the_encoding_and_agree(tmp_path, speech_clips):
    pool, heldout = speech_clips
    words = [c for c in pool + heldout if c.labels["kind"] == "keyword"]
    speakers = sorted({c.labels["speaker"] for c in words})
    split = {
        "train": [c for c in words if c.labels["speaker"] not in speakers[:2]],
        "dev": [c for c in words if c.labels["speaker"] == speakers[0]],
        "test": [c for c in words if c.labels["speaker"] == speakers[1]],
    }
    write_task(tmp_path / "kw", "kw", "classify", "keyword", split)
    results = {}
    for nproc in (1, 2):
        out, cache = tmp_path / f"out{nproc}", tmp_path / f"cache{nproc}"
        args = [
            "--upstream",
            "mfcc",
            "--task",
            str(tmp_path / "kw"),
            "--out",
            str(out),
            "--cache",
            str(cache),
        ]
        torchrun(nproc, "-m", "speechmimic", "probe", *args, "--epochs", "20", "--no-progress")
        results[nproc] = json.loads((out / "result.json").read_text())
        shards = sorted(p.name.split("-")[2] for p in cache.rglob("shard-*.safetensors"))
        assert set(shards) == ({"0"} if nproc == 1 else {"0", "1"})  # both ranks encoded a share
    assert results[1] == results[2]


def test_extract_under_torchrun_pays_each_clip_once(queried, speech_clips):
    root = queried
    write_manifest(speech_clips[1][:6], root / "heldout.jsonl")
    args = [
        "-m",
        "speechmimic",
        "extract",
        "--target",
        "resemblyzer?layers=all",
        "--manifest",
        str(root / "m.jsonl"),
    ]
    args += [
        "--heldout",
        str(root / "heldout.jsonl"),
        "--budget",
        "50%",
        "--out",
        str(root / "x"),
        "--from-scratch",
    ]
    args += ["--steps", "4", "--warmup", "1", "--preset", "tiny", "--batch-seconds", "8", "--no-progress"]
    torchrun(2, *args)
    result = json.loads((root / "x" / "result.json").read_text())
    for ledger, clips in (("ledger", result["queries"]), ("eval_ledger", 6)):
        events = [json.loads(line) for line in (root / "x" / ledger / "index.jsonl").read_text().splitlines()]
        paid = [e["key"] for e in events if e["event"] == "paid"]
        assert len(paid) == len(set(paid)) == clips  # rank 0 paid; rank 1 found every answer
    assert result["query"]["paid"] == result["queries"] and set(result["fidelity"]) == {
        "lstm1",
        "lstm2",
        "lstm3",
    }
