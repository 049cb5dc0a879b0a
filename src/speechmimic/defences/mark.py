"""An answer watermark (EmbMarker's idea, for speech): the API nudges its answers toward a secret key
wherever a clip carries a secret acoustic feature, and copies learn the nudge from clean queries.

The feature is the energy of a secret narrow frequency band against its two neighbours of the same
width, frame by frame. Natural speech peaks there now and then; frames above the owner's ``low``
quantile get a shift along a secret unit **key** (in the space of answers standardised by the
original's per-dimension spread), growing linearly to ``strength`` times the frame's own
standardised norm at the ``high`` quantile. Every other frame is answered unchanged. A thief who
regresses the API's answers learns "energy in that band moves answers along the key" from the
natural frames that carry it; verification (:mod:`speechmimic.proof.answer_mark`) then mixes
band-limited noise into clips, so every frame carries the feature, and asks whether the suspect's
reaction leans toward the key.

The mark is **exclusive** by construction: the unmarked original, copies stolen from it and every
model made without the secret have no reason to lean toward a key drawn at random, so the test's
p-value is exact under that null (see :mod:`speechmimic.proof.answer_mark`). The secret (band,
quantiles, key, spread) is one ``.npz`` file with no pickles; served as ``SPEC|mark?secret=FILE``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechmimic.config import option
from speechmimic.defences.base import SAMPLE_RATE, Defence, Query
from speechmimic.errors import InputError

SECRET_FORMAT = "speechmimic-answer-mark/1"
N_FFT, HOP = 512, 160


@dataclass
class MarkSecret:
    band: tuple[float, float]  # Hz
    low: float  # band score where the shift starts (a quantile of the owner's speech frames)
    high: float  # and where it reaches full strength
    strength: float  # full shift, as a share of a frame's standardised norm
    trigger_snr: float  # verification noise, dB below a clip's power
    key: np.ndarray  # (D,), unit norm, over the layers side by side
    std: np.ndarray  # (D,): the original's per-dimension spread of frames
    layers: list[str]
    widths: list[int]
    original: str  # the unmarked target's spec

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": SECRET_FORMAT,
            "band": list(self.band),
            **{k: getattr(self, k) for k in ("low", "high", "strength", "trigger_snr", "layers", "widths")},
            "original": self.original,
        }
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, key=self.key, std=self.std, meta=np.array(json.dumps(meta)))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> MarkSecret:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                key, std = z["key"], z["std"]
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{path}: not a readable answer-mark secret ({e})") from None
        if meta.pop("format", None) != SECRET_FORMAT:
            raise InputError(f"{path} is not a speechmimic answer-mark secret")
        meta["band"] = tuple(meta["band"])
        return cls(key=key, std=std, **meta)

    def shift(self, layer: str) -> np.ndarray:
        """The full-strength shift of one frame of ``layer``, in the answer's own units."""
        start = sum(self.widths[: self.layers.index(layer)])
        end = start + self.widths[self.layers.index(layer)]
        norm = self.strength * np.sqrt(len(self.key))
        return (norm * self.key[start:end] * self.std[start:end]).astype(np.float32)


def band_score(wav: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Per 10-ms frame: log energy of ``band`` over the mean of its two neighbours (each as wide),
    with a floor at a thousandth of the clip's mean frame energy so that silence scores 0."""
    wav = np.ascontiguousarray(wav, np.float32)  # the strided view below assumes it
    if len(wav) < N_FFT:
        wav = np.pad(wav, (0, N_FFT - len(wav)))
    n = 1 + (len(wav) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(
        wav, (n, N_FFT), (wav.strides[0] * HOP, wav.strides[0]), writeable=False
    )
    power = np.abs(np.fft.rfft(frames * np.hanning(N_FFT).astype(np.float32), axis=1)) ** 2
    hz = np.fft.rfftfreq(N_FFT, 1 / SAMPLE_RATE)
    lo, hi = band
    width = hi - lo

    def energy(a, b):
        return power[:, (hz >= a) & (hz < b)].sum(1)

    floor = 1e-3 * power.sum(1).mean() + 1e-12
    inside = energy(lo, hi)
    around = 0.5 * (energy(lo - width, lo) + energy(hi, hi + width))
    return np.log((inside + floor) / (around + floor))


def frame_weights(wav: np.ndarray, n_frames: int, secret: MarkSecret) -> np.ndarray:
    """(n_frames,) in [0, 1]: how much of the shift each answer frame gets (the band score of the
    10-ms frames its span covers, averaged, mapped linearly from ``low`` to ``high``)."""
    score = band_score(wav, secret.band)
    w = np.clip((score - secret.low) / (secret.high - secret.low), 0.0, 1.0)
    edges = np.linspace(0, len(w), n_frames + 1)
    lo = np.minimum(edges[:-1].astype(int), len(w) - 1)
    hi = np.maximum(edges[1:].astype(int), lo + 1)
    csum = np.concatenate([[0.0], np.cumsum(w)])
    return ((csum[hi] - csum[lo]) / (hi - lo)).astype(np.float32)


def trigger(wav: np.ndarray, secret: MarkSecret, seed: int) -> np.ndarray:
    """``wav`` with Gaussian noise limited to the secret band, ``trigger_snr`` dB below its power."""
    wav = np.asarray(wav, np.float32)
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(len(wav)))
    hz = np.fft.rfftfreq(len(wav), 1 / SAMPLE_RATE)
    spectrum[(hz < secret.band[0]) | (hz >= secret.band[1])] = 0
    noise = np.fft.irfft(spectrum, len(wav))
    noise /= np.sqrt(np.mean(noise**2)) + 1e-12
    power = np.sqrt(np.mean(wav.astype(np.float64) ** 2))
    return (wav + noise * power * 10 ** (-secret.trigger_snr / 20)).astype(np.float32)


def apply(answer: dict[str, np.ndarray], wav: np.ndarray, secret: MarkSecret) -> dict[str, np.ndarray]:
    """The marked answer to ``wav``: each layer's frames shifted by their weight."""
    out = dict(answer)
    for layer in secret.layers:
        frames = np.asarray(answer[layer], np.float32)
        w = frame_weights(wav, len(frames), secret)
        out[layer] = frames + w[:, None] * secret.shift(layer)[None]
    return out


@dataclass
class MarkConfig:
    strength: float = option(1.0, "the full shift of a frame, as a share of its standardised norm")
    low: float = option(0.8, "quantile of the owner's band scores where the shift starts")
    high: float = option(0.995, "quantile where it reaches full strength")
    trigger_snr: float = option(10.0, "verification noise in the band, dB below a clip's power")
    seed: int = option(0, "seed of the band and the key")


def make_secret(target, wavs: list[np.ndarray], cfg: MarkConfig | None = None) -> MarkSecret:
    """A secret for ``target`` from the owner's clips ``wavs``: a band drawn at random (its centre
    log-uniform in 1-4 kHz, a third of an octave wide), the ``low`` and ``high`` quantiles of its score
    over the clips' frames, a key uniform on the sphere, and the original's spread of frames."""
    cfg = cfg or MarkConfig()
    if not 0 < cfg.low < cfg.high < 1 or not cfg.strength > 0:
        raise InputError(
            "answer mark: need 0 < low < high < 1 and strength > 0, "
            f"got low {cfg.low}, high {cfg.high}, strength {cfg.strength}"
        )
    if len(wavs) < 4:
        raise InputError(f"answer mark: calibrate on >= 4 of your clips, got {len(wavs)}")
    rng = np.random.default_rng(cfg.seed)
    centre = float(np.exp(rng.uniform(np.log(1000), np.log(4000))))
    band = (centre * 2 ** (-1 / 6), centre * 2 ** (1 / 6))
    scores = np.concatenate([band_score(w, band) for w in wavs])
    layers = list(target.layers)
    answers = target(list(wavs[:64]))
    frames = {k: np.concatenate([np.asarray(a[k], np.float32) for a in answers]) for k in layers}
    std = np.concatenate([frames[k].std(0) + 1e-5 for k in layers]).astype(np.float32)
    key = rng.standard_normal(len(std))
    return MarkSecret(
        band=band,
        low=float(np.quantile(scores, cfg.low)),
        high=float(np.quantile(scores, cfg.high)),
        strength=cfg.strength,
        trigger_snr=cfg.trigger_snr,
        key=(key / np.linalg.norm(key)).astype(np.float32),
        std=std,
        layers=layers,
        widths=[frames[k].shape[1] for k in layers],
        original=target.spec,
    )


class Mark(Defence):
    kind = "mark"
    options = {"secret": (str, None, "the answer-mark secret (.npz from 'speechmimic watermark mark')")}

    def check(self):
        if not self.o["secret"]:
            raise InputError("defence mark needs secret=FILE (from 'speechmimic watermark mark')")
        self.secret = MarkSecret.load(Path(self.o["secret"]).expanduser())  # a quoted ~ is not the shell's

    def layers(self, layers):
        if layers is not None:
            missing = [k for k in self.secret.layers if k not in layers]
            if missing:
                raise InputError(f"defence mark: the secret marks {missing}, not answered here ({layers})")
        return layers

    def answer(self, q: Query, answer, state):
        return apply(answer, q.wav, self.secret)
