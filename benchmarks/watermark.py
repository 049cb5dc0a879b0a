"""Proof of theft on real data: the answer watermark (:mod:`speechmimic.defences.mark`) against
thieves, trained independent models and removal attacks.

The owner serves ``TARGET|mark?secret=...`` (secret drawn from the held-out part of the shared-data
pool, the owner's own clips). Every thief steals with ``extract`` (random selection, from scratch,
``--steps`` distillation steps) from the rest of the pool.

- **Copies** (the true-positive rate): stolen from the marked API at 10%, 25% and 50% of the pool,
  three thief seeds each.
- **Trained null models**, none made with the secret: the unmarked original and copies stolen from it
  (several budgets and seeds, and on other data: the package's synthetic-voice corpus), the original
  fine-tuned on other data (a denoising fine-tune on the synthetic voices) and a copy of that, and
  students stolen from the other real encoder, mapped into the owner's layers by a ridge regression
  fitted on public clips (an independent model made to speak the owner's format). They are split
  into a calibration set, which sets the decision threshold (0.01, or lower if a calibration null
  falls below it), and a disjoint test set, on which the false-positive rate is measured.
- **Removal attacks** on the 25% copy (seed 1), each at several strengths: self-distillation toward
  its own answers on augmented audio, global magnitude pruning, weight noise, re-distilling it into a
  fresh student, and thieves who change their queries (white noise, a random equaliser). Each reports
  the watermark test and the utility the copy keeps (probes on 30 words and short-crop speakers, best
  state, as a share of the unattacked copy's advantage over MFCC).
- **The mark's cost**: every probe of the suite (words, speakers, verification) on the original and on
  the marked API.

Verification: 64 pool clips no thief was given, each asked clean and with the trigger.

    python benchmarks/watermark.py --out /tmp/wm                 # resemblyzer; reruns resume
    python benchmarks/watermark.py --out /tmp/wm-wb --target 'whisper:base?layers=all'
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from speechmimic.audit.suites import shared_suite
from speechmimic.corpus import Clip
from speechmimic.defences import load_target
from speechmimic.defences.mark import MarkConfig, MarkSecret, make_secret
from speechmimic.distill import DistillConfig, augmented
from speechmimic.extract import ExtractConfig, extract
from speechmimic.ledger import Ledger
from speechmimic.masked import span_mask
from speechmimic.pretrain import Data2VecPredictor
from speechmimic.probe.pooled import state_scores
from speechmimic.proof.answer_mark import verify
from speechmimic.proof.watermark import ALPHA
from speechmimic.recipes.demo import demo_corpus
from speechmimic.student import Student, build_student
from speechmimic.upstream import load_upstream

OTHER = {"resemblyzer": "whisper:tiny.en?layers=all", "whisper": "resemblyzer?layers=all"}


def proof_split(suite, seed: int):
    """(verification clips, public clips, the thieves' pool, the owner's private clips): verification,
    public and thief clips drawn at random from the pool, so they are alike; private ones held out."""
    order = np.random.default_rng(seed).permutation(len(suite.pool))
    verification = [suite.pool[i].load() for i in order[:64]]
    public = [suite.pool[i].load() for i in order[64:192]]
    thief_pool = [suite.pool[i] for i in sorted(order[192:])]
    return verification, public, thief_pool, [c.load() for c in suite.heldout]


def steal(
    teacher: str, pool: list[Clip], out: Path, budget: str, seed: int, steps: int, ledger: Path
) -> Path:
    """A thief's student (resumed: an existing result is reused)."""
    if (out / "result.json").exists():
        return Path(json.loads((out / "result.json").read_text())["student"]["path"])
    cfg = ExtractConfig(
        budget=budget,
        strategy="random",
        seed=seed,
        preset="small",
        distill=DistillConfig(steps=steps, seed=seed),
    )
    return Path(
        extract(load_target(teacher), pool, out, cfg, progress=False, ledger_dir=ledger)["student"]["path"]
    )


def crops(wavs: list[np.ndarray], n: int, seconds: float, rng: random.Random) -> list[np.ndarray]:
    size = int(seconds * 16000)
    out = []
    for _ in range(n):
        w = wavs[rng.randrange(len(wavs))]
        s = rng.randrange(max(1, len(w) - size + 1))
        out.append(np.pad(w[s : s + size], (0, max(0, size - len(w[s : s + size])))))
    return out


def finetune_original(spec: str, wavs: list[np.ndarray], out: Path, steps: int, seed: int) -> str:
    """The original fine-tuned on other data: its answers to augmented clips pulled toward its own
    answers to the clean ones (a denoising fine-tune), saved as a loadable spec."""
    done = out / "spec.txt"
    if done.exists():
        return done.read_text()
    model, frozen = load_target(spec), load_target(spec)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.module.parameters(), lr=1e-4)
    for _ in range(steps):
        clean = crops(wavs, 4, 1.0, rng)
        x = torch.from_numpy(np.stack(clean))
        xa = torch.from_numpy(np.stack([augmented(w, rng) for w in clean]))
        with torch.no_grad():
            y = frozen.encode(x)
        ya = model.encode(xa)
        loss = sum(F.mse_loss(ya[k], y[k]) / y[k].var().clamp_min(1e-8) for k in y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.mkdir(parents=True, exist_ok=True)
    spec = model.save_weights(out)
    done.write_text(spec)
    return spec


class Aligned(nn.Module):
    """An independent upstream made to answer in the owner's layers: its predicted states, frame by
    frame, through a ridge regression fitted on public clips' time means against the unmarked original."""

    def __init__(
        self, upstream: nn.Module, reference: nn.Module, public: list[np.ndarray], layers: list[str]
    ):
        super().__init__()
        from sklearn.linear_model import Ridge

        self.upstream, self.layers = upstream, layers
        names = list(upstream.hidden_state_names)
        self.use = [i for i, n in enumerate(names) if n.startswith("pred.")] or list(range(len(names)))
        x = np.stack([self.frames(w).mean(0) for w in public])
        where = [list(reference.hidden_state_names).index(k) for k in layers]
        y = []
        for w in public:
            with torch.no_grad():
                states = reference([torch.from_numpy(w)])["hidden_states"]
            y.append(np.concatenate([states[i][0].float().mean(0).numpy() for i in where]))
        self.widths = [len(states[i][0][0]) for i in where]
        self.ridge = Ridge(alpha=10.0).fit(x, np.stack(y))
        self.hidden_state_names = layers

    @torch.no_grad()
    def frames(self, wav) -> np.ndarray:
        """(T, D): the upstream's chosen states side by side, frame by frame."""
        states = self.upstream([torch.as_tensor(wav)])["hidden_states"]
        return torch.cat([states[i][0].float() for i in self.use], 1).numpy()

    @torch.no_grad()
    def forward(self, wavs):
        out = {k: [] for k in self.layers}
        for w in wavs:
            y = np.split(self.ridge.predict(self.frames(w)), np.cumsum(self.widths)[:-1], axis=1)
            for k, part in zip(self.layers, y, strict=True):
                out[k].append(torch.from_numpy(part.astype(np.float32)))
        return {"hidden_states": [torch.stack(out[k]) for k in self.layers]}


# -- removal attacks on a stolen student -----------------------------------------------------------------
def pruned(student: Student, share: float) -> Student:
    """Global magnitude pruning of every weight matrix and kernel."""
    s = copy.deepcopy(student)
    weights = [p for p in s.parameters() if p.dim() >= 2]
    cut = torch.quantile(torch.cat([p.detach().abs().flatten() for p in weights])[::7], share)
    with torch.no_grad():
        for p in weights:
            p.mul_((p.abs() > cut).float())
    return s


def noised(student: Student, rel: float, seed: int) -> Student:
    """Every tensor plus Gaussian noise of ``rel`` times its own spread."""
    s = copy.deepcopy(student)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in s.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * rel)
    return s


def distilled(
    teacher: Student, student: Student, wavs: list[np.ndarray], steps: int, seed: int, augment: bool
) -> Student:
    """``student`` trained to answer as ``teacher`` (standardised head outputs) on crops of ``wavs``;
    with ``augment``, the student hears an augmented view of what the teacher heard."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    teacher = teacher.eval()
    student = student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4)
    for _ in range(steps):
        clean = crops(wavs, 8, 1.0, rng)
        x = torch.from_numpy(np.stack(clean))
        xs = torch.from_numpy(np.stack([augmented(w, rng) for w in clean])) if augment else x
        with torch.no_grad():
            want = teacher(x)[2]
        got = student(xs)[2]
        loss = sum(F.l1_loss(got[k], want[k]) for k in want) / len(want)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()


def stage1_tuned(victim: Student, wavs: list[np.ndarray], steps: int, seed: int) -> Student:
    """The copy fine-tuned with a stage-1 objective on the thief's own audio (data2vec: its masked
    frames regress an EMA teacher's top layers); its heads stay as they were."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = Data2VecPredictor(copy.deepcopy(victim)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    for _ in range(steps):
        x = torch.from_numpy(np.stack(crops(wavs, 8, 1.0, rng)))
        t = int(model.student.cfg.num_frames(x.shape[1]))
        mask = span_mask([t] * len(x), t, 0.08, 10, np_rng)
        pred, target, valid = model(x, x, torch.full((len(x),), x.shape[1]), mask)
        chosen = mask & valid
        loss = F.mse_loss(pred[chosen], target[chosen])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.ema_update(0.999)
    return model.student.eval()


def transformed_pool(pool: list[Clip], out: Path, kind: str, seed: int) -> list[Clip]:
    """The thief's pool as it queries it: white noise at 20 dB SNR, or a random equaliser (six
    octave bands, each +-6 dB), per clip; written once as wav files."""
    out.mkdir(parents=True, exist_ok=True)
    clips = []
    for i, c in enumerate(pool):
        path = out / f"{i}.wav"
        if not path.exists():
            w = c.load()
            rng = np.random.default_rng([seed, i])
            if kind == "noise":
                w = w + rng.standard_normal(len(w)) * np.sqrt(np.mean(w**2)) * 10 ** (-20 / 20)
            else:
                spec = np.fft.rfft(w)
                hz = np.fft.rfftfreq(len(w), 1 / 16000)
                edges = 125 * 2.0 ** np.arange(7)
                gains = 10 ** (rng.uniform(-6, 6, len(edges)) / 20)
                spec *= np.interp(np.log2(np.maximum(hz, 1)), np.log2(edges), gains)
                w = np.fft.irfft(spec, len(w))
            sf.write(path, np.clip(w, -1, 1).astype(np.float32), 16000)
        clips.append(Clip(f"{kind}{i}", str(path), 16000, c.num_samples, c.duration, 0.0, dict(c.labels)))
    return clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default="/tmp/watermark-bench")
    ap.add_argument("--target", default="resemblyzer?layers=all", help="the owner's encoder")
    ap.add_argument("--steps", type=int, default=200, help="thieves' distillation steps")
    ap.add_argument(
        "--strength", type=float, default=1.0, help="the mark's full shift (share of a frame's norm)"
    )
    ap.add_argument("--low", type=float, default=0.8, help="band-score quantile where the shift starts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-utility", action="store_true", help="skip the probes (detection only)")
    ap.add_argument(
        "--strengths",
        choices=("all", "one"),
        default="all",
        help="removal attacks at every strength or one each",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    target, root = args.target, Path(args.out)
    other = OTHER["whisper" if target.startswith("whisper") else "resemblyzer"]
    suite = shared_suite(args.data, args.seed)
    verification, public, thief_pool, private = proof_split(suite, args.seed)
    synthetic = demo_corpus()[0]
    t0 = time.time()

    secret_path = root / "owner" / "secret.npz"
    if not secret_path.exists():
        cfg = MarkConfig(strength=args.strength, low=args.low, seed=args.seed)
        secret = make_secret(load_target(target), private, cfg)
        secret.save(secret_path)
    secret = MarkSecret.load(secret_path)
    marked = f"{target}|mark?secret={secret_path}"
    print(f"secret: band {secret.band[0]:.0f}-{secret.band[1]:.0f} Hz", flush=True)

    def ledger(name):
        return Ledger(root / "ledgers" / name)

    rows_dir = root / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    utilities: dict[str, dict] = {}

    def utility(name: str, make) -> dict:
        path = root / "utility" / f"{name}.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            probes = {k: suite.probes[k] for k in ("words", "speakers")}
            scores = {k: max(v.values()) for k, v in state_scores(make(), probes).items()}
            path.write_text(json.dumps(scores))
        utilities[name] = json.loads(path.read_text())
        return utilities[name]

    def row(name: str, group: str, make, utility_of: bool = False) -> dict:
        path = rows_dir / f"{name.replace(' ', '_').replace('%', 'pct').replace('/', '-')}.json"
        if not path.exists():
            t = time.time()
            found = verify(make(), secret, verification)
            path.write_text(
                json.dumps({"name": name, "group": group, "seconds": round(time.time() - t, 1), **found})
            )
        r = json.loads(path.read_text())
        if utility_of and not args.no_utility:
            r["utility"] = utility(name, make)
        print(
            f"{name:44s} {group:12s} cos {r['mean_cosine']:+.3f} z {r['z']:+7.2f} p {r['p_value']:.2e}",
            flush=True,
        )
        return r

    def student(path):
        return lambda: load_upstream(path)

    rows = []
    rows.append(
        row("marked API", "owner", lambda: load_upstream(marked, ledger=ledger("verify-marked")), True)
    )
    rows.append(
        row(
            "unmarked original",
            "calibration",
            lambda: load_upstream(target, ledger=ledger("verify-original")),
            True,
        )
    )
    utility("mfcc", lambda: load_upstream("mfcc"))

    copies = {}
    for budget in ("10%", "25%", "50%"):
        for seed in (1, 2, 3):
            name = f"copy of the marked API {budget} s{seed}"
            path = steal(
                marked,
                thief_pool,
                root / "thieves" / f"marked-{budget[:-1]}-{seed}",
                budget,
                seed,
                args.steps,
                root / "ledgers" / "marked",
            )
            copies[name] = path
            rows.append(row(name, "copy", student(path), utility_of=seed == 1))

    # trained null models: calibration set, then the disjoint test set
    nulls = [
        ("10%", 1, "calibration"), ("25%", 2, "calibration"), ("50%", 2, "calibration"),
        ("10%", 2, "test"), ("25%", 1, "test"), ("25%", 3, "test"), ("50%", 1, "test"), ("10%", 3, "test"),
        ("50%", 3, "test"),
    ]  # fmt: skip
    for budget, seed, group in nulls:
        path = steal(
            target,
            thief_pool,
            root / "thieves" / f"original-{budget[:-1]}-{seed}",
            budget,
            seed,
            args.steps,
            root / "ledgers" / "original",
        )
        rows.append(row(f"copy of the original {budget} s{seed}", group, student(path)))
    for seed, group in ((1, "calibration"), (2, "test")):
        path = steal(
            target,
            synthetic,
            root / "thieves" / f"synthetic-{seed}",
            "50%",
            seed,
            args.steps,
            root / "ledgers" / "synthetic",
        )
        rows.append(row(f"copy of the original on synthetic voices s{seed}", group, student(path)))
    tuned = finetune_original(target, [c.load() for c in synthetic], root / "finetuned", 100, args.seed)
    rows.append(
        row(
            "original fine-tuned on synthetic voices",
            "calibration",
            lambda: load_upstream(tuned, ledger=ledger("verify-tuned")),
        )
    )
    path = steal(
        tuned, thief_pool, root / "thieves" / "tuned-25-1", "25%", 1, args.steps, root / "ledgers" / "tuned"
    )
    rows.append(row("copy of the fine-tuned original 25% s1", "test", student(path)))
    reference = load_upstream(target, ledger=ledger("align"))
    for budget, seed, group in (("10%", 1, "calibration"), ("25%", 1, "test"), ("25%", 2, "test")):
        path = steal(
            other,
            thief_pool,
            root / "thieves" / f"other-{budget[:-1]}-{seed}",
            budget,
            seed,
            args.steps,
            root / "ledgers" / "other",
        )
        rows.append(
            row(
                f"copy of {other.split('?')[0]} {budget} s{seed}, aligned",
                group,
                lambda p=path: Aligned(load_upstream(p), reference, public, secret.layers),
            )
        )

    # removal attacks on the 25% copy, seed 1
    victim_path = copies["copy of the marked API 25% s1"]
    victim, config = Student.load(victim_path)
    thief_wavs = [c.load() for c in thief_pool[:400]]

    def attacked(name: str, make_student):
        out = root / "removal" / name.replace(" ", "_").replace("%", "pct")
        if not (out / "config.json").exists():
            make_student().save(out, {k: v for k, v in config.items() if k not in ("speechmimic", "student")})
        rows.append(row(name, "removal", student(out), utility_of=True))

    def strengths(*values):
        return values if args.strengths == "all" else values[-2:-1]

    for share in strengths(0.3, 0.6, 0.8):
        attacked(f"pruned {share:.0%}", lambda s=share: pruned(victim, s))
    for rel in strengths(0.05, 0.1, 0.2):
        attacked(f"weight noise {rel}", lambda r=rel: noised(victim, r, 1))
    for steps in strengths(100, 300):
        attacked(
            f"self-distilled, augmented, {steps} steps",
            lambda n=steps: distilled(victim, copy.deepcopy(victim), thief_wavs, n, 1, True),
        )
    for steps in strengths(100, 300):
        attacked(
            f"stage-1 objective (data2vec), {steps} steps",
            lambda n=steps: stage1_tuned(victim, thief_wavs, n, 1),
        )
    for steps in strengths(200, 600):

        def fresh(n=steps):
            torch.manual_seed(7)
            s = build_student("small", [h.spec for h in victim.heads.values()])
            for k, h in s.heads.items():
                h.set_stats(victim.heads[k].mean.numpy(), victim.heads[k].std.numpy())
            return distilled(victim, s, thief_wavs, n, 2, False)

        attacked(f"re-distilled into a fresh student, {steps} steps", fresh)
    for kind in strengths("noise", "equaliser"):
        pool = transformed_pool(thief_pool, root / "pools" / kind, kind, 1)
        path = steal(
            marked,
            pool,
            root / "thieves" / f"marked-{kind}-25-1",
            "25%",
            1,
            args.steps,
            root / "ledgers" / f"marked-{kind}",
        )
        rows.append(row(f"thief queries with {kind} 25% s1", "removal", student(path), utility_of=True))

    cost_path = root / "cost.json"
    if not cost_path.exists():  # every probe of the suite, verification included, on both
        scores = {}
        for name, spec in (("original", target), ("marked", marked)):
            up = load_upstream(spec, ledger=ledger(f"cost-{name}"))
            scores[name] = {k: max(v.values()) for k, v in state_scores(up, suite.probes).items()}
        cost_path.write_text(json.dumps(scores))
    summary(rows, utilities, json.loads(cost_path.read_text()), root, time.time() - t0)


def summary(rows: list[dict], utilities: dict, probes: dict, root: Path, seconds: float) -> None:
    calibration = [r for r in rows if r["group"] == "calibration"]
    threshold = min([ALPHA] + [r["p_value"] for r in calibration])
    test = [r for r in rows if r["group"] == "test"]
    fp = [r["name"] for r in test if r["p_value"] < threshold]
    print(
        f"\nthreshold {threshold:.3g} (calibration nulls: {len(calibration)}, lowest p "
        f"{min(r['p_value'] for r in calibration):.3g})"
    )
    print(f"false positives on the test set: {len(fp)} of {len(test)} {fp}")
    for budget in ("10%", "25%", "50%"):
        c = [r for r in rows if r["group"] == "copy" and f" {budget} " in r["name"]]
        hits = sum(r["p_value"] < threshold for r in c)
        zs = ", ".join(f"{r['z']:.1f}" for r in c)
        print(f"copies at {budget}: found {hits} of {len(c)}, z {zs}")

    def score(u):
        return float(np.mean(list(u.values())))

    mfcc = score(utilities["mfcc"]) if "mfcc" in utilities else None
    base = utilities.get("copy of the marked API 25% s1")
    cost = {k: round(100 * (probes["original"][k] - probes["marked"][k]), 2) for k in probes["marked"]}
    print(f"the owner's probes: {probes}; the mark's cost in points (original - marked): {cost}")
    for r in rows:
        if r["group"] == "removal" and r["name"] in utilities and base and mfcc is not None:
            kept = (score(utilities[r["name"]]) - mfcc) / (score(base) - mfcc)
            r["kept"] = round(kept, 3)
            found = "found" if r["p_value"] < threshold else "NOT found"
            print(
                f"removal {r['name']:44s} {found:9s} z {r['z']:+6.2f} keeps {kept:.0%} of the copy's utility"
            )
    print(f"total {seconds:.0f} s")
    (root / "result.json").write_text(
        json.dumps(
            {
                "threshold": threshold,
                "false_positives": fp,
                "cost_points": cost,
                "rows": rows,
                "utilities": utilities,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
