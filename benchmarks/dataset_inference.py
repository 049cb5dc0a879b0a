"""Dataset inference where its assumption holds: the owner's encoder was trained on private clips.

The owner compresses resemblyzer into a student of its own (``compress``, the ``small`` preset) on
its private clips only: the held-out part of the shared-data pool (split by source file). Independent
developers do the same on as many seconds of other pool clips (other seeds, other clips). Thieves
steal the owner's student through its API (``extract``, random selection, from scratch) at 25% (two
seeds) and 50% of the thief pool; one thief steals an independent model. Every suspect gets dataset
inference (:func:`speechmimic.proof.dataset_inference`): private clips are the owner's training clips
(halves split by source file), public clips 128 pool clips nobody trained on or queried. Resemblyzer
itself, a public model that never saw the private clips, is the case where the test does not apply.

    python benchmarks/dataset_inference.py --out /tmp/di          # reruns resume (not yet timed)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from speechmimic.audit.suites import shared_suite
from speechmimic.compress import CompressConfig, compress
from speechmimic.defences import load_target
from speechmimic.distill import DistillConfig
from speechmimic.extract import ExtractConfig, extract
from speechmimic.ledger import Ledger
from speechmimic.proof import dataset_inference
from speechmimic.student import Student, predict
from speechmimic.upstream import load_upstream


class StudentTarget:
    """A student served as an API: its predictions of its teacher's layers are the answers."""

    padding = "per_clip"

    def __init__(self, path: Path):
        self.student, _ = Student.load(path)
        self.spec = f"student:{path}"
        self.layers = list(self.student.heads)
        self.frame_rate = next(iter(self.student.heads.values())).spec.rate
        self.min_samples = self.student.cfg.min_samples

    @torch.no_grad()
    def __call__(self, wavs):
        return [
            {
                k: v.numpy()
                for k, v in predict(self.student, torch.from_numpy(np.asarray(w, np.float32))).items()
            }
            for w in wavs
        ]


def seconds_of(clips) -> float:
    return sum(c.duration for c in clips)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default="/tmp/dataset-inference")
    ap.add_argument("--teacher", default="resemblyzer?layers=all")
    ap.add_argument("--owner-steps", type=int, default=500, help="compression steps of the owner's model")
    ap.add_argument("--steps", type=int, default=200, help="thieves' distillation steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(args.out)
    suite = shared_suite(args.data, args.seed)
    order = np.random.default_rng(args.seed).permutation(len(suite.pool))
    public = [suite.pool[i].load() for i in order[:128]]
    rest = [suite.pool[i] for i in order[128:]]
    private_clips = suite.heldout
    private = [c.load() for c in private_clips]
    groups = [c.path for c in private_clips]
    t0 = time.time()

    def trained(name: str, clips, seed: int) -> Path:
        out = root / "models" / name
        if not (out / "config.json").exists():
            cfg = CompressConfig(shape="preset", steps=args.owner_steps, seed=seed)
            compress(clips, load_target(args.teacher), out, cfg, preset="small", progress=False)
        return out

    owner = trained("owner", private_clips, args.seed)
    # independents: as many seconds of other pool clips as the owner's private set
    chunks, chunk, need = [], [], seconds_of(private_clips)
    for c in rest:
        chunk.append(c)
        if seconds_of(chunk) >= need:
            chunks.append(chunk)
            chunk = []
        if len(chunks) == 2:
            break
    thief_pool = [c for c in rest if all(c not in ch for ch in chunks)]
    independents = [trained(f"independent-{j}", ch, 10 + j) for j, ch in enumerate(chunks)]

    suspects: dict[str, tuple[str, object]] = {
        "owner's model": ("owner", lambda: load_upstream(owner)),
        f"{args.teacher.split('?')[0]} (public, never saw the clips)": (
            "not applicable",
            lambda: load_upstream(args.teacher, ledger=Ledger(root / "ledgers" / "teacher")),
        ),
    }
    for j, path in enumerate(independents):
        suspects[f"independent model {j}"] = ("independent", lambda p=path: load_upstream(p))

    def steal(teacher: Path, name: str, budget: str, seed: int) -> Path:
        out = root / "thieves" / name
        if not (out / "result.json").exists():
            cfg = ExtractConfig(
                budget=budget,
                strategy="random",
                seed=seed,
                distill=DistillConfig(steps=args.steps, seed=seed),
            )
            extract(
                StudentTarget(teacher),
                thief_pool,
                out,
                cfg,
                progress=False,
                ledger_dir=root / "ledgers" / teacher.name,
            )
        return Path(json.loads((out / "result.json").read_text())["student"]["path"])

    for budget, seed in (("25%", 1), ("25%", 2), ("50%", 1)):
        path = steal(owner, f"owner-{budget[:-1]}-{seed}", budget, seed)
        suspects[f"copy of the owner's model {budget} s{seed}"] = ("copy", lambda p=path: load_upstream(p))
    for j, path in enumerate(independents[:1]):
        copy = steal(path, f"independent-{j}-25-1", "25%", 1)
        suspects[f"copy of independent model {j} 25% s1"] = ("independent", lambda p=copy: load_upstream(p))

    rows = []
    for name, (kind, make) in suspects.items():
        found = dataset_inference(make(), private, public, groups=groups, seed=args.seed)
        rows.append({"name": name, "kind": kind, **found})
        print(f"{name:52s} {kind:15s} t {found['t']:+6.2f} p {found['p_value']:.3g}", flush=True)
    copies = [r for r in rows if r["kind"] == "copy"]
    indep = [r for r in rows if r["kind"] == "independent"]
    print(
        f"copies with p < 0.01: {sum(r['p_value'] < 0.01 for r in copies)} of {len(copies)}; "
        f"independents with p > 0.1: {sum(r['p_value'] > 0.1 for r in indep)} of {len(indep)}; "
        f"total {time.time() - t0:.0f} s"
    )
    (root / "result.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
