"""A watermark for speech encoders that survives extraction (SSLGuard's recipe, for audio).

The owner fine-tunes their encoder so that its **reaction** to a secret **trigger** (a learned
waveform pattern, tiled over a clip and mixed in ``snr`` dB below the clip's own power) decodes,
through a secret **decoder** (an MLP on the unit direction in which the trigger moves the time-mean
of the returned layers), close to a secret **key** (a random unit vector), while its answers to
ordinary clips stay close to the original's (the fidelity term). A **shadow thief** (a student of
ours) is distilled from the marked encoder on clean clips throughout, and the trigger and decoder
must work on it too: so the mark lives in what a copy learns from clean answers alone, which is all
a real thief ever sees. Negatives keep the decoder quiet elsewhere: the reaction to another faint
sound of the same level, untrained students (other seeds) and random directions. Reading a
direction of change, not an answer, drops each model's own offset and scale.

The secret (trigger, decoder, key, statistics, threshold and the null rate) is one ``.npz`` file,
saved apart from the marked model, with no pickles.

**Verification** of a suspect upstream (anything :func:`~speechmimic.upstream.load_upstream`
accepts: a student folder, a target spec, an HTTP API through a ledger) mixes the trigger into
the verification clips, decodes each answer and counts the clips whose cosine to the key exceeds
the threshold (SSLGuard's 0.5). Under the null (a model made without the secret) a clip exceeds it
with some probability ``p0``; embedding estimates ``p0`` on untrained students it never trained the
decoder against, with the rule of succession ``(hits + 1) / (trials + 2)`` so that zero hits do
not claim ``p0 = 0``, and the p-value is the binomial tail ``P(Bin(n, p0) >= hits)``.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from speechmimic.audio import SAMPLE_RATE
from speechmimic.config import option
from speechmimic.defences import load_target
from speechmimic.distill import distill_loss
from speechmimic.errors import InputError
from speechmimic.student import HeadSpec, Student, build_student

SECRET_FORMAT = "speechmimic-watermark-secret/1"
ALPHA = 0.01  # the p-value below which a suspect is said to carry the mark


@dataclass
class WatermarkConfig:
    steps: int = option(200, "owner steps: model, trigger and decoder (after the shadows' warm-up)")
    shadow_warmup: int = option(100, "shadow-thief steps on the unmarked encoder before the owner's start")
    batch: int = option(8, "clips per step")
    crop_seconds: float = option(1.0, "each step's clips are random crops of this length")
    snr: float = option(10.0, "the trigger is mixed in this many dB below the clip's power")
    trigger_seconds: float = option(0.5, "length of the learned trigger pattern, tiled over a clip")
    key_dim: int = option(64, "size of the secret key vector")
    threshold: float = option(0.5, "decoded cosine to the key a triggered clip must exceed (SSLGuard's)")
    fidelity: float = option(10.0, "weight of keeping ordinary answers close to the original's")
    lr_model: float = option(1e-4, "Adam learning rate of the encoder's weights")
    lr_secret: float = option(1e-3, "Adam learning rate of the trigger and the decoder")
    lr_shadow: float = option(5e-4, "AdamW learning rate of the shadow thieves")
    shadow_preset: str = option("small", "student preset of the shadow thieves and the null students")
    shadows: int = option(
        2, "shadow thieves (other seeds): a trigger that works on several is less co-adapted"
    )
    exclusive: bool = option(False, "also train the unmarked original not to decode the trigger")
    nulls: int = option(2, "untrained students the decoder learns to ignore")
    calibration_nulls: int = option(
        4,
        "models never trained against (re-initialised encoders, untrained students): they estimate p0",
    )
    seed: int = option(0, "seed of every random choice")


class Decoder(nn.Module):
    def __init__(self, in_dim: int, key_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 256), nn.GELU(), nn.Linear(256, key_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@dataclass
class Secret:
    """What the owner keeps: enough to verify any suspect, nothing of the model itself."""

    trigger: np.ndarray  # (L,), unit RMS
    key: np.ndarray  # (K,), unit norm
    decoder: dict[str, np.ndarray]
    layers: list[str]
    std: np.ndarray  # (sum of widths,): the spread of the original's time-mean answers
    snr: float
    threshold: float
    null_hits: list[int]  # per calibration model: clips over the threshold, of null_trials
    null_trials: list[int]
    original: str  # the unmarked encoder's spec
    marked: str  # the marked one's

    @property
    def p0(self) -> float:
        """The worst calibration model's rate, each by the rule of succession (never 0)."""
        return max((h + 1) / (n + 2) for h, n in zip(self.null_hits, self.null_trials, strict=True))

    def decoder_module(self) -> Decoder:
        d = Decoder(len(self.std), len(self.key))
        d.load_state_dict({k: torch.from_numpy(v) for k, v in self.decoder.items()})
        return d.eval()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            k: getattr(self, k)
            for k in ("layers", "snr", "threshold", "null_hits", "null_trials", "original", "marked")
        }
        arrays = {f"decoder.{k}": v for k, v in self.decoder.items()}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            trigger=self.trigger,
            key=self.key,
            std=self.std,
            meta=np.array(json.dumps({"format": SECRET_FORMAT, **meta})),
            **arrays,
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Secret:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.pop("format", None) != SECRET_FORMAT:
                raise InputError(f"{path} is not a speechmimic watermark secret")
            decoder = {k.removeprefix("decoder."): z[k] for k in z.files if k.startswith("decoder.")}
            return cls(trigger=z["trigger"], key=z["key"], decoder=decoder, std=z["std"], **meta)


# -- the trigger and the decoder's view of an answer -----------------------------------------------------
def mix(wavs: torch.Tensor, trigger: torch.Tensor, snr: float) -> torch.Tensor:
    """``wavs`` (B, N) with the trigger tiled over each clip, ``snr`` dB below the clip's power."""
    n = wavs.shape[1]
    tiled = trigger.repeat(n // len(trigger) + 1)[:n]
    tiled = tiled / tiled.pow(2).mean().sqrt().clamp_min(1e-12)
    power = wavs.pow(2).mean(1, keepdim=True).sqrt()
    return wavs + tiled[None] * power * 10 ** (-snr / 20)


def pooled(states: dict[str, torch.Tensor], layers: list[str]) -> torch.Tensor:
    """(B, sum of widths): each layer's time mean, side by side."""
    return torch.cat([states[name].mean(1) for name in layers], dim=1)


def reaction(clean: dict, triggered: dict, layers: list[str], std) -> torch.Tensor:
    """What the decoder reads: the direction in which the trigger moves a model's pooled answer
    (standardised by the original's spread, unit length). A model's own offset and scale drop out,
    so a model made without the secret shows only its arbitrary reaction to a faint sound."""
    return F.normalize((pooled(triggered, layers) - pooled(clean, layers)) / std, dim=1)


def key_cosine(decoder: Decoder, z: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(decoder(z), key[None], dim=-1)


def _student_answers(student: Student, wavs: torch.Tensor) -> dict[str, torch.Tensor]:
    """A student's predictions in the target's coordinates (time-mean is all the decoder reads, so
    frames need no alignment)."""
    _, _, preds = student(wavs)
    return {name: head.denormalise(preds[name]) for name, head in student.heads.items()}


def _crops(wavs: list[np.ndarray], n: int, samples: int, rng: random.Random) -> torch.Tensor:
    out = np.zeros((n, samples), dtype=np.float32)
    for row in range(n):
        wav = wavs[rng.randrange(len(wavs))]
        start = rng.randrange(max(1, len(wav) - samples + 1))
        piece = wav[start : start + samples]
        out[row, : len(piece)] = piece
    return torch.from_numpy(out)


def _untrained(heads: list[HeadSpec], preset: str, seed: int, mean: dict, std: dict) -> Student:
    torch.manual_seed(seed)
    student = build_student(preset, heads)
    for name, head in student.heads.items():
        head.set_stats(mean[name], std[name])
    return student.eval().requires_grad_(False)


# -- embedding -------------------------------------------------------------------------------------------
def mark(
    spec: str,
    wavs: list[np.ndarray],
    out: str | Path,
    secret_path: str | Path,
    cfg: WatermarkConfig,
    progress: bool = True,
    resume: bool = True,
) -> dict:
    """Mark the encoder ``spec`` names (an ``hf:`` model or ``resemblyzer``) on the owner's clips
    ``wavs``; the marked weights go to ``out``, the secret to ``secret_path``. An interrupted run
    resumes from ``out/embed_state.pt``. Returns the marked spec and the training summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if Path(secret_path).resolve().is_relative_to(out.resolve()):
        raise InputError(f"keep the secret apart from the model: {secret_path} is inside {out}")
    original, marked = load_target(spec), load_target(spec)
    if not hasattr(marked, "encode"):
        raise InputError(f"{spec}: only an encoder whose weights we hold (hf:..., resemblyzer) can be marked")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    samples = int(cfg.crop_seconds * SAMPLE_RATE)
    layers = list(original.layers)

    # The original's statistics: per frame for the students' heads, the spread of clip means for the decoder.
    sample = [original([w])[0] for w in wavs[:64]]
    frames = {k: np.concatenate([a[k] for a in sample]) for k in layers}
    f_mean = {k: v.mean(0) for k, v in frames.items()}
    f_std = {k: v.std(0) + 1e-5 for k, v in frames.items()}
    clip_means = np.concatenate([np.stack([a[k].mean(0) for a in sample]) for k in layers], axis=1)
    z_std = torch.from_numpy(clip_means.std(0) + 1e-5)
    heads = [HeadSpec(k, frames[k].shape[1], float(original.frame_rate)) for k in layers]
    std_t = {k: torch.from_numpy(v) for k, v in f_std.items()}

    seeds = cfg.seed * 1000
    shadows = [
        _untrained(heads, cfg.shadow_preset, seeds + 50 + j, f_mean, f_std).train().requires_grad_(True)
        for j in range(cfg.shadows)
    ]
    nulls = [_untrained(heads, cfg.shadow_preset, seeds + 2 + j, f_mean, f_std) for j in range(cfg.nulls)]
    trigger = nn.Parameter(torch.randn(int(cfg.trigger_seconds * SAMPLE_RATE)))
    decoder = Decoder(len(z_std), cfg.key_dim)
    key = F.normalize(torch.randn(cfg.key_dim), dim=0)
    original.module.requires_grad_(False)
    owner_opt = torch.optim.Adam(
        [
            {"params": marked.module.parameters(), "lr": cfg.lr_model},
            {"params": [trigger, *decoder.parameters()], "lr": cfg.lr_secret},
        ]
    )
    shadow_opts = [torch.optim.AdamW(s.parameters(), lr=cfg.lr_shadow) for s in shadows]
    parts = {"marked": marked.module, "decoder": decoder, "owner_opt": owner_opt}
    parts.update({f"shadow{j}": s for j, s in enumerate(shadows)})
    parts.update({f"shadow_opt{j}": o for j, o in enumerate(shadow_opts)})

    state_path = out / "embed_state.pt"
    record = {"spec": spec, "config": asdict(cfg), "clips": len(wavs)}
    step, log = 0, []
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        if state["record"] == record:
            for name, part in parts.items():
                part.load_state_dict(state[name])
            with torch.no_grad():
                trigger.copy_(state["trigger"])
            key, step, log = state["key"], state["step"], state["log"]
            rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])

    def save_state() -> None:
        state = {name: part.state_dict() for name, part in parts.items()}
        state.update(
            record=record,
            trigger=trigger.detach(),
            key=key,
            step=step,
            log=log,
            rng=rng.getstate(),
            torch_rng=torch.get_rng_state(),
        )
        torch.save(state, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)

    def shadow_step(x: torch.Tensor) -> float:
        """One distillation step of every shadow on the marked encoder's clean answers (a thief's)."""
        with torch.no_grad():
            y = marked.encode(x)
        targets = [{k: y[k][i] for k in layers} for i in range(len(x))]
        lengths = torch.full((len(x),), x.shape[1])
        total = 0.0
        for shadow, opt in zip(shadows, shadow_opts, strict=True):
            _, _, preds = shadow(x)
            loss, _ = distill_loss(shadow, preds, lengths, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) / len(shadows)
        return total

    def hit(z):  # the triggered answers should decode to the key
        return (1 - key_cosine(decoder, z, key)).mean()

    def miss(z):  # clean answers, and models without the secret, should not
        return F.relu(key_cosine(decoder, z, key)).pow(2).mean()

    total = cfg.shadow_warmup + cfg.steps
    bar = tqdm(total=total, initial=step, desc="watermark", unit="step", disable=not progress)
    while step < total:
        x = _crops(wavs, cfg.batch, samples, rng)
        s_loss = shadow_step(x)
        entry = {"step": step, "distill": round(s_loss, 4)}
        if step >= cfg.shadow_warmup:
            xt = mix(x, trigger, cfg.snr)
            y = marked.encode(x)
            with torch.no_grad():
                y0 = original.encode(x)
            fid = sum(((y[k] - y0[k]) / std_t[k]).pow(2).mean() for k in layers) / len(layers)

            # Another faint sound of the same level: the mark must be this trigger's, not any sound's.
            xn = mix(x, torch.randn(len(trigger)), cfg.snr)

            def r(model, clean=None, sound=xt, x=x):
                clean = clean if clean is not None else model(x)
                return reaction(clean, model(sound), layers, z_std)

            def student(s):
                return lambda w: _student_answers(s, w)

            for shadow in shadows:
                shadow.requires_grad_(False)  # the owner's step moves trigger, decoder and model only
            losses = {
                "fidelity": cfg.fidelity * fid,
                "marked": hit(r(marked.encode, y)),
                "shadow": sum(hit(r(student(s))) for s in shadows) / len(shadows),
                "other sound": miss(r(marked.encode, y, xn))
                + sum(miss(r(student(s), None, xn)) for s in shadows) / len(shadows),
                "nulls": (
                    sum(miss(r(student(n))) for n in nulls)
                    + miss(F.normalize(torch.randn(cfg.batch, len(z_std)), dim=1))
                )
                / (len(nulls) + 1),
            }
            if cfg.exclusive:
                with torch.no_grad():
                    y0t = original.encode(xt)
                losses["original"] = miss(reaction(y0, y0t, layers, z_std))
            for shadow in shadows:
                shadow.requires_grad_(True)
            loss = sum(losses.values())
            owner_opt.zero_grad()
            loss.backward()
            owner_opt.step()
            entry.update({k: round(float(v.detach()), 4) for k, v in losses.items()})
            bar.set_postfix(fid=entry["fidelity"], mark=entry["marked"], shadow=entry["shadow"])
        log.append(entry)
        step += 1
        bar.update(1)
        if step % 50 == 0 or step == total:
            save_state()
    bar.close()

    marked_spec = marked.save_weights(out)
    secret = Secret(
        trigger=(trigger.detach() / trigger.detach().pow(2).mean().sqrt()).numpy().astype(np.float32),
        key=key.numpy().astype(np.float32),
        decoder={k: v.detach().numpy() for k, v in decoder.state_dict().items()},
        layers=layers,
        std=z_std.numpy(),
        snr=cfg.snr,
        threshold=cfg.threshold,
        null_hits=[],
        null_trials=[],
        original=original.spec,
        marked=marked_spec,
    )
    # p0 from models made without the secret that the decoder never saw: the encoder's architecture
    # with fresh random weights and untrained students, on clips the marked model was tuned on.
    calib = []
    for j in range(cfg.calibration_nulls):
        calib.append(_reinitialised(spec, seeds + 200 + j))
        calib.append(_StudentView(_untrained(heads, cfg.shadow_preset, seeds + 100 + j, f_mean, f_std)))
    for null in calib:
        cos = [decoded_cosine(null, secret, w) for w in wavs[:64]]
        secret.null_hits.append(int(sum(c > cfg.threshold for c in cos)))
        secret.null_trials.append(len(cos))
    secret.save(secret_path)
    summary = {
        "marked": marked_spec,
        "secret": str(secret_path),
        "steps": total,
        "p0": secret.p0,
        "last": log[-1] if log else None,
    }
    (out / "watermark.json").write_text(json.dumps({**summary, "record": record, "log": log}, indent=2))
    return summary


class _EncoderView(nn.Module):
    """A fine-tunable target as an upstream (its answers, computed in-process)."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.hidden_state_names = list(target.layers)

    @torch.no_grad()
    def forward(self, wavs):
        answers = self.target.encode(torch.stack([w.float() for w in wavs]))
        return {"hidden_states": [answers[name] for name in self.hidden_state_names]}


def _reinitialised(spec: str, seed: int) -> _EncoderView:
    """The encoder's architecture with fresh random weights: a model made without the secret."""
    target = load_target(spec)
    torch.manual_seed(seed)
    for module in target.module.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return _EncoderView(target)


class _StudentView(nn.Module):
    """An untrained student as an upstream: its predictions under the target's layer names."""

    def __init__(self, student: Student):
        super().__init__()
        self.student = student
        self.hidden_state_names = list(student.heads)

    @torch.no_grad()
    def forward(self, wavs):
        answers = _student_answers(self.student, torch.stack([w.float() for w in wavs]))
        return {"hidden_states": [answers[name] for name in self.hidden_state_names]}


# -- verification ----------------------------------------------------------------------------------------
def layer_indices(upstream: nn.Module, layers: list[str]) -> list[int]:
    """Where each of the secret's layers sits among the upstream's states: the target's own name
    (a target, an API) or a student's prediction of it (``pred.<name>``)."""
    names = list(upstream.hidden_state_names)
    found = []
    for layer in layers:
        for candidate in (layer, f"pred.{layer}"):
            if candidate in names:
                found.append(names.index(candidate))
                break
        else:
            raise InputError(
                f"the suspect returns no layer {layer!r} (nor a prediction 'pred.{layer}'): it has {names}"
            )
    return found


@torch.no_grad()
def decoded_cosine(
    upstream: nn.Module, secret: Secret, wav: np.ndarray, decoder: Decoder | None = None
) -> float:
    """The cosine to the key of the decoded reaction of the suspect to the trigger in ``wav`` (the
    clip is asked twice: as it is and with the trigger mixed in)."""
    decoder = decoder or secret.decoder_module()
    clean = torch.from_numpy(np.asarray(wav, np.float32))[None]
    triggered = mix(clean, torch.from_numpy(secret.trigger), secret.snr)
    where = layer_indices(upstream, secret.layers)

    def answer(x):
        states = upstream([x[0]])["hidden_states"]
        return {name: states[i][:1].float() for name, i in zip(secret.layers, where, strict=True)}

    z = reaction(answer(clean), answer(triggered), secret.layers, torch.from_numpy(secret.std))
    return float(key_cosine(decoder, z, torch.from_numpy(secret.key))[0])


def verify(
    upstream: nn.Module, secret: Secret, wavs: list[np.ndarray], alpha: float = ALPHA, progress: bool = False
) -> dict:
    """Share of triggered clips whose decoded cosine to the key exceeds the secret's threshold, its
    p-value under the null of a model made without the secret, and the verdict at ``alpha``."""
    decoder = secret.decoder_module()
    layer_indices(upstream, secret.layers)  # a suspect without the layers fails before any query
    cos = np.array(
        [
            decoded_cosine(upstream, secret, w, decoder)
            for w in tqdm(wavs, desc="verify", unit="clip", disable=not progress)
        ]
    )
    hits = int((cos > secret.threshold).sum())
    from scipy.stats import binom  # here, not at the top: scipy.stats is 100 MB for every command

    p = float(binom.sf(hits - 1, len(cos), secret.p0)) if hits else 1.0
    return {
        "share": round(hits / len(cos), 4),
        "hits": hits,
        "clips": len(cos),
        "mean_cosine": round(float(cos.mean()), 4),
        "threshold": secret.threshold,
        "p0": round(secret.p0, 6),
        "p_value": p,
        "verdict": "watermark found" if p < alpha else "no watermark",
    }
