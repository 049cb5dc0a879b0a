"""Proof of theft on real data: does a watermarked encoder's mark survive extraction, does it stay
silent on models made without the secret, what does it cost the owner, and does dataset inference
tell stolen copies from independent ones?

The owner marks resemblyzer (all three LSTM layers; ``--target 'whisper:base?layers=all'``: Whisper
base's encoder, its seven states) on their own clips: the held-out part of the
shared-data pool (FSDD train split and LibriSpeech segments of <= 4 s, split by source file; never
queried by any thief). Thieves steal with ``extract`` (random selection, from scratch, stage 2 only)
from the rest of the pool at each budget, from the marked encoder and from the unmarked original.
Independent models: encoders of the target's shape with random weights, students stolen from such a
random encoder (independently trained, same shapes), and untrained students. Each suspect gets the watermark
test (the trigger mixed into 64 random pool clips no thief was given) and dataset inference
(private: the owner's clips, halves split by source file; public: 128 other random pool clips no
thief was given). The owner's utility: the shared-data probes (30 words, short-crop speakers,
verification) on the original and the marked encoder. The random encoders here use other seeds than
those the embedding calibrates p0 on.

    python benchmarks/fingerprint.py --out /tmp/wm-bench       # ~23 min on 2 CPU cores; reruns resume
    python benchmarks/fingerprint.py --out /tmp/wm-whisper --target 'whisper:base?layers=all'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from watermark import proof_split  # the same split as the answer mark's benchmark (this folder)

from speechmimic.audit.suites import shared_suite
from speechmimic.defences import load_target
from speechmimic.distill import DistillConfig
from speechmimic.extract import ExtractConfig, extract
from speechmimic.ledger import Ledger
from speechmimic.probe.pooled import state_scores
from speechmimic.proof import Secret, WatermarkConfig, examine, mark
from speechmimic.student import build_student
from speechmimic.upstream import StudentUpstream, load_upstream


def random_encoder(spec: str, out: Path, seed: int) -> str:
    """The encoder's architecture with freshly initialised weights, saved as a loadable spec."""
    target = load_target(spec)
    torch.manual_seed(seed)
    for module in target.module.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return target.save_weights(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default="/tmp/watermark-bench")
    ap.add_argument("--budgets", nargs="+", default=["25%", "50%"])
    ap.add_argument("--steps", type=int, default=200, help="thieves' distillation steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--target", default="resemblyzer?layers=all", help="the owner's encoder (default: resemblyzer)"
    )
    args = ap.parse_args()
    target = args.target
    kind_name = "LSTM" if target.startswith("resemblyzer") else "encoder"
    torch.set_num_threads(2)
    root = Path(args.out)
    suite = shared_suite(args.data, args.seed)
    verification, public, thief_pool, private = proof_split(suite, args.seed)

    t0 = time.time()
    secret_path = root / "owner" / "secret.npz"
    if not secret_path.exists():
        mark(target, private, root / "marked", secret_path, WatermarkConfig(seed=args.seed))
    secret = Secret.load(secret_path)
    print(f"embedding: {time.time() - t0:.0f} s, p0 = {secret.p0:.4f}", flush=True)

    suspects: dict[str, tuple[str, object]] = {
        "marked encoder": (
            "owner",
            lambda: load_upstream(secret.marked, ledger=Ledger(root / "ledgers" / "marked")),
        ),
        "unmarked original": (
            "owner",
            lambda: load_upstream(target, ledger=Ledger(root / "ledgers" / "original")),
        ),
    }
    teachers = {"marked": secret.marked, "original": target}
    for j in range(3):
        spec = random_encoder(target, root / "independent" / f"random-{j}", 1000 + j)
        suspects[f"random {kind_name} {j}"] = (
            "independent",
            lambda s=spec, j=j: load_upstream(s, ledger=Ledger(root / "ledgers" / f"random-{j}")),
        )
        if j < 2:
            teachers[f"random {kind_name} {j}"] = spec
    for j in range(2):
        torch.manual_seed(2000 + j)
        student = build_student("small", _heads(load_target(target)))
        suspects[f"untrained student {j}"] = ("independent", lambda s=student: StudentUpstream(s, {}))

    times = {}
    for teacher, spec in teachers.items():
        budgets = args.budgets if teacher in ("marked", "original") else args.budgets[:1]
        for budget in budgets:
            name = f"stolen from {teacher} at {budget}"
            out = root / "thieves" / teacher.replace(" ", "-") / budget.replace("%", "pct")
            t = time.time()
            cfg = ExtractConfig(
                budget=budget,
                strategy="random",
                seed=args.seed + 1,
                preset="small",
                distill=DistillConfig(steps=args.steps, seed=args.seed + 1),
            )
            result = extract(load_target(spec), thief_pool, out, cfg, progress=False)
            times[name] = round(time.time() - t, 1)
            kind = "stolen" if teacher == "marked" else ("owner" if teacher == "original" else "independent")
            suspects[name] = (kind, lambda p=result["student"]["path"]: load_upstream(p))
            print(f"{name}: {times[name]} s", flush=True)

    rows = {}
    for name, (kind, make) in suspects.items():
        groups = [c.path for c in suite.heldout]
        found = examine(make(), secret, verification, private, public, groups, seed=args.seed)
        rows[name] = {"kind": kind, **found}
        w, d = found["watermark"], found["dataset_inference"]
        print(
            f"{name:32s} {kind:11s} share {w['share']:.3f} cos {w['mean_cosine']:+.3f} "
            f"p {w['p_value']:.2e} {w['verdict']:15s} | DI t {d['t']:+.2f} p {d['p_value']:.3g}",
            flush=True,
        )

    probes = {}
    for name, spec in (("original", target), ("marked", secret.marked)):
        up = load_upstream(spec, ledger=Ledger(root / "ledgers" / f"probes-{name}"))
        probes[name] = {k: max(v.values()) for k, v in state_scores(up, suite.probes).items()}
    cost = {k: round(100 * (probes["original"][k] - probes["marked"][k]), 2) for k in probes["original"]}
    print("owner's probes (best layer):", json.dumps(probes), "cost in points:", cost)

    independent = [r for r in rows.values() if r["kind"] == "independent"]
    false_positives = sum(r["watermark"]["verdict"] == "watermark found" for r in independent)
    stolen = [r for r in rows.values() if r["kind"] == "stolen"]
    found = sum(r["watermark"]["verdict"] == "watermark found" for r in stolen)
    print(
        f"independent models flagged: {false_positives} of {len(independent)}; "
        f"stolen copies found: {found} of {len(stolen)}; total {time.time() - t0:.0f} s"
    )
    (root / "result.json").write_text(
        json.dumps(
            {"p0": secret.p0, "rows": rows, "probes": probes, "cost_points": cost, "thief_seconds": times},
            indent=2,
        )
    )


def _heads(target):
    """The students' heads for the target's layers: widths from one answer, the target's rate."""
    from speechmimic.student import HeadSpec

    answer = target([np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1])[0]
    return [HeadSpec(name, answer[name].shape[1], float(target.frame_rate)) for name in target.layers]


if __name__ == "__main__":
    main()
