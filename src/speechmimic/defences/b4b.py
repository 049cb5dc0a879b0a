"""B4B (Dubinski et al., NeurIPS 2023): noise that grows with how much of the embedding space a key
has covered.

Each answer's utterance embedding (time mean of every returned layer), standardised by the owner's
calibration statistics, is hashed by ``sets`` independent sets of ``planes`` random hyperplanes
through the origin; a key's coverage ``c`` is the mean, over the sets, of the share of the
``2**planes`` buckets its answers have filled. The answer then gets Gaussian noise of relative
amplitude ``sigma(c) = lambda * (exp(ln(alpha / lambda) * c / beta) - 1)`` (times each layer's RMS in
that answer): negligible while a key stays in its own corner, as an honest application does, and
``alpha`` once it has swept a share ``beta`` of the space. The noise is a function of (seed, key,
clip), so asking again returns the same noisy answer. With ``per=clip`` (the default, as B4B perturbs
one representation per query) one noise vector is added to every frame of the answer: a thief who
regresses frames cannot average it away over the frames of a clip, only over clips; ``per=frame``
draws it anew for every frame.

``calibration=FILE.npz`` holds ``mean`` and ``std`` of utterance embeddings of ordinary traffic
(:func:`calibrate`); without it the raw embeddings are hashed, and answers that share one large
direction fall into few buckets whoever asks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from speechmimic.defences.base import Defence, Query, rms, rng_for, utterance_embedding
from speechmimic.errors import InputError


def calibrate(answers, path: str | Path) -> Path:
    """Write the ``calibration`` file of :class:`B4B` from answers of ordinary traffic."""
    e = np.stack([utterance_embedding(a) for a in answers])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mean=e.mean(0), std=e.std(0) + 1e-8)
    return path


class B4B(Defence):
    kind = "b4b"
    stateful = True
    options = {
        "planes": (int, 12, "hyperplanes per set: 2**planes buckets"),
        "sets": (int, 20, "independent sets of hyperplanes (coverage is their mean)"),
        "lambda": (float, 1e-6, "noise scale near zero coverage"),
        "alpha": (float, 1.0, "noise amplitude (relative to each layer's RMS) at coverage beta"),
        "beta": (float, 0.8, "coverage at which the noise reaches alpha"),
        "calibration": (str, None, "npz of mean and std of ordinary utterance embeddings"),
        "per": (str, "clip", "clip: one noise vector for all frames of an answer; frame: one per frame"),
        "seed": (int, 0, "seed of the hyperplanes and the noise"),
    }

    def check(self):
        o = self.o
        if not 1 <= o["planes"] <= 20 or o["sets"] < 1:
            raise InputError("defence b4b: planes must be in 1..20 and sets >= 1")
        if not (0 < o["lambda"] < o["alpha"]) or not o["beta"] > 0:
            raise InputError("defence b4b: need 0 < lambda < alpha and beta > 0")
        if o["per"] not in ("clip", "frame"):
            raise InputError(f"defence b4b: per must be clip or frame, got {o['per']!r}")
        self._stats = None
        if o["calibration"]:
            with np.load(o["calibration"]) as z:
                self._stats = (z["mean"], z["std"])
        self._planes: np.ndarray | None = None

    def new_state(self):
        return {"filled": np.zeros((self.o["sets"], 2 ** self.o["planes"]), bool)}

    def _buckets(self, e: np.ndarray) -> np.ndarray:
        if self._stats is not None:
            if len(self._stats[0]) != len(e):
                raise InputError(
                    f"defence b4b: the calibration is of {len(self._stats[0])}-d embeddings, "
                    f"the answers' are {len(e)}-d"
                )
            e = (e - self._stats[0]) / self._stats[1]
        if self._planes is None or self._planes.shape[2] != len(e):
            rng = rng_for(self.o["seed"], "b4b-planes", len(e))
            self._planes = rng.standard_normal((self.o["sets"], self.o["planes"], len(e)))
        bits = (self._planes @ e) > 0  # (sets, planes)
        return bits.astype(np.int64) @ (1 << np.arange(self.o["planes"]))

    def sigma(self, coverage: float) -> float:
        lam, alpha, beta = self.o["lambda"], self.o["alpha"], self.o["beta"]
        return lam * (math.exp(math.log(alpha / lam) * coverage / beta) - 1)

    def answer(self, q: Query, answer, state):
        filled = state["filled"]
        filled[np.arange(len(filled)), self._buckets(utterance_embedding(answer))] = True
        sigma = self.sigma(float(filled.mean()))
        out = {}
        for name, frames in answer.items():
            x = np.asarray(frames, np.float32)
            rng = rng_for(self.o["seed"], "b4b-noise", q.account, q.digest, name)
            shape = (1, x.shape[1]) if self.o["per"] == "clip" else x.shape
            out[name] = (x + sigma * rms(x) * rng.standard_normal(shape)).astype(np.float32)
        state["last_sigma"] = np.float64(sigma)
        return out

    def status(self, state):
        coverage = float(state["filled"].mean())
        return {"coverage": round(coverage, 5), "sigma": self.sigma(coverage)}
