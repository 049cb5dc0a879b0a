"""What the wire costs: audio-seconds per second through ``speechmimic serve`` and an ``http://`` target,
against calling the same target in-process, at client concurrency 1, 8 and 32, side by side in one run.

In-process, the target answers the clips in batches of ``concurrency`` clips (one call each). Over
HTTP, the attack's own ``http://`` target sends them with ``concurrency`` requests in flight, with
the ledger's content keys as ``Idempotency-Key`` (the server stores every answer with its charge, as
in a real attack): in batches (``POST /v1/embed/batch``, the server offers them), or one clip a
request with ``--no-batches``; the server batches concurrent requests dynamically. Each round over
HTTP uses a fresh API key, so no answer is replayed from the store. Rounds alternate (in-process,
HTTP) ``--repeats`` times and the medians are compared; latency percentiles are over every HTTP
request of the rounds.

    python benchmarks/serve.py                          # resemblyzer (the demo's target), 96 clips: ~1 min
    python benchmarks/serve.py --target hubert-base --clips 32    # a HuBERT Base-size encoder: ~4 min
    python benchmarks/serve.py --target 'hf:DIR?layers=all'

``hubert-base`` is transformers' default HuBERT configuration (12 layers, 768-d: HuBERT Base) with
seeded random weights, returning layers 4, 8 and 12: the compute and the answer size of the real
model, which cannot be downloaded here. The lighter the model, the larger the share of each request
the wire costs: resemblyzer answers a second of audio in ~6 ms, HuBERT Base in ~120 ms (2 threads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from speechmimic.audio import SAMPLE_RATE
from speechmimic.ledger import content_key
from speechmimic.recipes.demo import demo_corpus
from speechmimic.serve.process import ServerProcess
from speechmimic.targets import load_backend
from speechmimic.targets.http import HTTPTarget

KEY_ENV = "SPEECHMIMIC_BENCH_KEY"


class TimedHTTPTarget(HTTPTarget):
    """The attack's HTTP target, timing each request."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latencies: list[float] = []

    def _send(self, *args):
        t = time.perf_counter()
        out = super()._send(*args)
        self.latencies.append(time.perf_counter() - t)
        return out


def hubert_base(root: Path) -> str:
    """A HuBERT Base-size encoder with seeded random weights, saved in ``root``; its target spec."""
    import transformers

    torch.manual_seed(0)
    transformers.HubertModel(transformers.HubertConfig()).save_pretrained(root / "hubert-base")
    return f"hf:{root / 'hubert-base'}?layers=4,8,12"


def in_process(target, wavs: list[np.ndarray], concurrency: int) -> float:
    t = time.perf_counter()
    for i in range(0, len(wavs), concurrency):
        target(wavs[i : i + concurrency])
    return time.perf_counter() - t


def over_http(
    server: ServerProcess, wavs, keys, concurrency: int, round_no: int, batches: bool = True
) -> tuple[float, list[float]]:
    os.environ[KEY_ENV] = server.key(f"bench-c{concurrency}-r{round_no}")
    target = TimedHTTPTarget(server.url, key_env=KEY_ENV, concurrency=concurrency)
    if not batches:
        target.max_batch = 0
    t = time.perf_counter()
    target(wavs, keys=keys)
    elapsed = time.perf_counter() - t
    target.close()
    return elapsed, target.latencies


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--target",
        default="resemblyzer?layers=all",
        help="target spec, or 'hubert-base' (HuBERT Base-size, random weights); default: resemblyzer, the "
        "lightest",
    )
    p.add_argument("--clips", type=int, default=96, help="clips of the demo corpus per round (default: 96)")
    p.add_argument("--concurrency", default="1,8,32", help="client concurrencies (default: 1,8,32)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds per concurrency (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in-process (default: 2)")
    p.add_argument(
        "--server-threads", type=int, default=1, help="torch threads of each server model worker (default: 1)"
    )
    p.add_argument("--model-workers", type=int, default=2, help="serve --model-workers (default: 2)")
    p.add_argument(
        "--max-batch-seconds", type=float, default=30.0, help="serve --max-batch-seconds (default: 30)"
    )
    p.add_argument("--no-batches", action="store_true", help="one clip a request, as before batches")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    pool, _ = demo_corpus()
    wavs = [c.load() for c in pool[: args.clips]]
    keys = [content_key(w) for w in wavs]
    seconds = sum(len(w) for w in wavs) / SAMPLE_RATE
    scratch = tempfile.TemporaryDirectory()
    spec = hubert_base(Path(scratch.name)) if args.target == "hubert-base" else args.target
    target = load_backend(spec)
    target(wavs[:4])  # warm up
    levels = [int(c) for c in args.concurrency.split(",")]
    print(
        f"target {target.spec}; {len(wavs)} clips, {seconds:.1f} s of audio per round; in-process "
        f"{args.threads} torch threads; server {args.model_workers} model workers x {args.server_threads} "
        f"torch threads; {'one clip a request' if args.no_batches else 'batches'}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        flags = (
            "--model-workers",
            str(args.model_workers),
            "--max-batch-seconds",
            str(args.max_batch_seconds),
        )
        with ServerProcess(Path(tmp), spec, *flags, threads=args.server_threads) as server:
            over_http(server, wavs[:8], None, 4, -1)  # warm up: connections, first batches
            for c in levels:
                local, remote, latencies = [], [], []
                for r in range(args.repeats):
                    local.append(in_process(target, wavs, c))
                    elapsed, lat = over_http(server, wavs, keys, c, r, not args.no_batches)
                    remote.append(elapsed)
                    latencies += lat
                row = {
                    "concurrency": c,
                    "in_process_audio_s_per_s": seconds / float(np.median(local)),
                    "http_audio_s_per_s": seconds / float(np.median(remote)),
                    "p50_ms": float(np.percentile(latencies, 50) * 1000),
                    "p99_ms": float(np.percentile(latencies, 99) * 1000),
                }
                row["ratio"] = row["http_audio_s_per_s"] / row["in_process_audio_s_per_s"]
                rows.append(row)
                print(
                    f"concurrency {c:>3}: in-process {row['in_process_audio_s_per_s']:7.1f} audio-s/s, "
                    f"HTTP {row['http_audio_s_per_s']:7.1f} audio-s/s, ratio {row['ratio']:.2f}; "
                    f"latency p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms",
                    flush=True,
                )
            charged = sum(k.samples for k in server.keys()) / SAMPLE_RATE
    print()
    print("| concurrency | in-process audio-s/s | HTTP audio-s/s | HTTP / in-process | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['in_process_audio_s_per_s']:.1f} | {r['http_audio_s_per_s']:.1f} | "
              f"{r['ratio']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")  # fmt: skip
    rounds = len(levels) * args.repeats
    print(f"\nthe server charged {charged:.1f} s over all rounds ({rounds} x {seconds:.1f} s + the warm-up)")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"target": target.spec, "clips": len(wavs), "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
