"""Peak memory and disk of every stage at 1x, 4x and 16x the corpus, in one run.

The corpus is all of ``../shared/data`` (FSDD, the Speech Commands subset, the LibriSpeech subset: 3400
files, 40 min). At N x it is N copies of that tree as symbolic links (so ``corpus scan`` really
decodes N times the files), and after the scan copy j's clips start j x 5 ms later (and end where
they ended), so no two copies hold the same audio and the ledger pays for every one. Each stage runs
as its own ``speechmimic`` command, as a user would run it, and its peak resident memory is read from
the kernel (``wait4``'s ``ru_maxrss``):

    scan      corpus scan --max-seconds 4
    pretrain  pretrain --iterations 1 (MFCC k-means units over every clip, then --steps steps)
    score     score (the stage-1 student over every clip)
    select    select --strategy diversity --budget 10% (k-center on the scores)
    query     query the 10% from resemblyzer (its three layers) into a float16 ledger
    distill   distill on those answers (--steps steps)

Prints, per stage and scale, the peak RSS and what the stage wrote, and the ratio of the peak at the
largest scale to the smallest (the bound to meet: <= 1.3). Training steps are the same at every scale:
memory should depend on the batch, not on the corpus.

    python benchmarks/memory.py                      # 1x, 4x, 16x: about 25 min on 2 CPU cores
    python benchmarks/memory.py --scales 1 2 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speechmimic.corpus import read_manifest, write_manifest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("fsdd/recordings", "speech_commands_subset", "librispeech_test_other_subset")
SHIFT = 0.005  # seconds later that copy j's clips start, per copy
MIN_LEFT = 0.1  # a clip is shifted only if this much of it remains
STAGES = ("scan", "pretrain", "score", "select", "query", "distill")


def link_tree(root: Path, copies: int) -> int:
    """``copies`` trees of links to the shared data's audio under ``root``; returns the file count."""
    n = 0
    for j in range(copies):
        for name in SETS:
            src = DATA / name
            for path in sorted(src.rglob("*")):
                if path.suffix.lower() in (".wav", ".flac"):
                    link = root / f"copy{j:02d}" / name / path.relative_to(src)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(path)
                    n += 1
    return n


def shift_copies(scanned: Path, pool: Path) -> tuple[int, float]:
    """Copy j's clips start ``j * SHIFT`` seconds later; returns the clips and their hours."""
    clips = read_manifest(scanned)
    for clip in clips:
        j = int(clip.id.split("-", 1)[0][4:])  # ids start with their copy's folder, copyNN
        shift = j * SHIFT
        if clip.duration - shift < MIN_LEFT:
            continue
        cut = round(shift * clip.sampling_rate)
        clip.offset += cut / clip.sampling_rate
        clip.num_samples -= cut
        clip.duration = clip.num_samples / clip.sampling_rate
    write_manifest(clips, pool)
    return len(clips), sum(c.duration for c in clips) / 3600


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def run_stage(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``speechmimic ARGS``; its peak RSS in MB and its wall seconds."""
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "speechmimic", *args], stdout=out, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(
            f"speechmimic {' '.join(args)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}"
        )
    return usage.ru_maxrss / 1024, time.time() - t0  # Linux reports kB


def one_scale(scale: int, work: Path, steps: int) -> dict:
    d = work / f"{scale}x"
    d.mkdir(parents=True)
    files = link_tree(d / "tree", scale)
    rows: dict[str, dict] = {}

    def stage(name: str, args: list[str], product: Path) -> None:
        rss, seconds = run_stage(args, d / f"{name}.log")
        rows[name] = {
            "rss_mb": round(rss, 1),
            "seconds": round(seconds, 1),
            "disk_mb": round(folder_bytes(product) / 2**20, 2),
        }
        print(
            f"  {scale:>2}x {name:<8} peak {rss:7.0f} MB  {seconds:6.1f} s  "
            f"wrote {rows[name]['disk_mb']:9.2f} MB",
            flush=True,
        )

    stage(
        "scan",
        [
            "corpus",
            "scan",
            str(d / "tree"),
            "--out",
            str(d / "scan.jsonl"),
            "--max-seconds",
            "4",
            "--no-progress",
        ],
        d / "scan.jsonl",
    )
    clips, hours = shift_copies(d / "scan.jsonl", d / "pool.jsonl")
    train = ["--steps", str(steps), "--warmup", "1", "--no-progress"]
    stage(
        "pretrain",
        [
            "pretrain",
            "--manifest",
            str(d / "pool.jsonl"),
            "--out",
            str(d / "stage1"),
            "--iterations",
            "1",
            *train,
        ],
        d / "stage1",
    )
    stage(
        "score",
        [
            "score",
            "--student",
            str(d / "stage1" / "iter1"),
            "--manifest",
            str(d / "pool.jsonl"),
            "--out",
            str(d / "scores.npz"),
            "--n-masks",
            "1",
            "--no-progress",
        ],
        d / "scores.npz",
    )
    stage(
        "select",
        [
            "select",
            "--manifest",
            str(d / "pool.jsonl"),
            "--budget",
            "10%",
            "--strategy",
            "diversity",
            "--scores",
            str(d / "scores.npz"),
            "--out",
            str(d / "chosen.jsonl"),
        ],
        d / "chosen.jsonl",
    )
    stage(
        "query",
        [
            "query",
            "--target",
            "resemblyzer?layers=all",
            "--manifest",
            str(d / "chosen.jsonl"),
            "--ledger",
            str(d / "ledger"),
            "--no-progress",
        ],
        d / "ledger",
    )
    stage(
        "distill",
        [
            "distill",
            "--manifest",
            str(d / "chosen.jsonl"),
            "--ledger",
            str(d / "ledger"),
            "--out",
            str(d / "student"),
            "--stage1",
            str(d / "stage1" / "iter1"),
            *train,
        ],
        d / "student",
    )
    queried = sum(c.duration for c in read_manifest(d / "chosen.jsonl"))
    return {
        "files": files,
        "clips": clips,
        "hours": round(hours, 3),
        "queried_seconds": round(queried, 1),
        "stages": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--scales", type=int, nargs="+", default=[1, 4, 16], help="corpus sizes, in copies of the shared data"
    )
    ap.add_argument(
        "--steps", type=int, default=20, help="training steps of pretrain and distill, at every scale"
    )
    ap.add_argument(
        "--work", default=None, help="folder for the corpora and products (default: a temporary one, removed)"
    )
    ap.add_argument("--json", default=None, help="also write every number to this file")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark reads the shared data beside the project")
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="speechmimic-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for scale in sorted(args.scales):
            print(f"{scale}x the corpus:", flush=True)
            results[scale] = one_scale(scale, work, args.steps)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    lo, hi = min(results), max(results)
    print()
    print("| scale | files | clips | hours | queried s |")
    print("|---|---|---|---|---|")
    for s, r in results.items():
        print(f"| {s}x | {r['files']} | {r['clips']} | {r['hours']} | {r['queried_seconds']} |")
    print()
    head = " | ".join(f"peak RSS {s}x (MB)" for s in results)
    print(f"| stage | {head} | {hi}x / {lo}x | wrote at {lo}x (MB) | wrote at {hi}x (MB) |")
    print("|---" * (len(results) + 4) + "|")
    worst = 0.0
    for name in STAGES:
        row = {s: results[s]["stages"][name] for s in results}
        ratio = row[hi]["rss_mb"] / row[lo]["rss_mb"]
        worst = max(worst, ratio)
        cells = " | ".join(f"{r['rss_mb']:,.0f}" for r in row.values())
        print(f"| {name} | {cells} | {ratio:.2f} | {row[lo]['disk_mb']:,.2f} | {row[hi]['disk_mb']:,.2f} |")
    ledger = {s: r["stages"]["query"]["disk_mb"] * 2**20 / r["queried_seconds"] for s, r in results.items()}
    print(
        f"\nworst peak-RSS ratio {hi}x / {lo}x: {worst:.2f} (bound 1.3); ledger bytes per queried second: "
        + ", ".join(f"{s}x {b:,.0f}" for s, b in ledger.items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"scales": results, "worst_ratio": worst}, indent=1))


if __name__ == "__main__":
    main()
