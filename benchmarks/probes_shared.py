"""Probe scores of a real pretrained upstream against MFCC on the real speech beside the project.

Tasks: FSDD digits (usual split), 6-speaker FSDD ID, 30 Speech Commands words, 10-speaker LibriSpeech
ID and verification on 3-s crops of it (EER; all from ../shared/data), and phoneme recognition
(linear CTC head, PER) on an espeak-ng corpus with unseen dev/test voices. Upstreams: resemblyzer
(all three LSTM layers) and 39-d MFCC, probed with the same heads, splits and seed; majority / blank /
unigram baselines beside them.

    python benchmarks/probes_shared.py [--data ../shared/data] [--out /tmp/sm-probes] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from speechmimic.probe import ProbeConfig, probe
from speechmimic.recipes import espeak, shared

ROOT = Path(__file__).resolve().parents[1]
UPSTREAMS = {"resemblyzer": "resemblyzer?layers=all", "mfcc": "mfcc"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument(
        "--out", default="/tmp/speechmimic-bench-probes", help="work folder (tasks, caches, results)"
    )
    ap.add_argument("--seed", type=int, default=0, help="probe seed (default: 0)")
    ap.add_argument("--espeak-utterances", type=int, default=600, help="size of the espeak-ng phoneme corpus")
    args = ap.parse_args(argv)

    out = Path(args.out)
    tasks = []
    if Path(args.data).is_dir():
        tasks += shared.build(args.data, out / "tasks", seed=args.seed, progress=False)
    else:
        print(f"skipping the shared-data tasks: {args.data} is absent (see shared/data/README.md)")
    if shutil.which("espeak-ng"):
        tasks += espeak.build(
            out / "espeak", n_utterances=args.espeak_utterances, seed=args.seed, progress=False
        )
    else:
        print("skipping phoneme recognition: espeak-ng is not installed (apt-get install espeak-ng)")
    if not tasks:
        return 1

    rows = []
    for task in tasks:
        row = {"task": task.name, "metric": task.metric}
        for name, spec in UPSTREAMS.items():
            t = time.time()
            r = probe(
                spec,
                task,
                out_dir=out / "results" / task.name / name,
                cfg=ProbeConfig(seed=args.seed),
                cache_dir=out / "cache",
                progress=False,
                ledger=out / "ledger",
            )
            row[name] = r["test"]
            row["baselines"] = r["baselines"]
            row[f"{name}_seconds"] = round(time.time() - t, 1)
            row[f"{name}_weights"] = r["layer_weights"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    lines = [
        "| task | metric | test clips | trivial baselines | MFCC | resemblyzer |",
        "|---|---|---|---|---|---|",
    ]
    for task, row in zip(tasks, rows, strict=True):
        trivial = ", ".join(f"{k} {v:.3f}" for k, v in row["baselines"].items())
        lines.append(
            f"| {row['task']} | {row['metric']} | {len(task.split('test'))} | {trivial} | "
            f"{row['mfcc']:.3f} | {row['resemblyzer']:.3f} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    (out / "probes_shared.md").write_text(table + "\n")
    (out / "probes_shared.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
