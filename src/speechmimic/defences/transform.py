"""A secret transformation per API key: each account gets its answers in its own coordinates.

``transform?kind=rotate|shuffle&pad=N&seed=S``: ``rotate`` multiplies every frame by a random
orthogonal matrix (per layer, per account); ``shuffle`` appends ``pad`` dimensions of noise (a
function of the frame, so fixed per answer) and permutes all dimensions. Distances and angles within
one account stay as they were (rotation keeps them exactly; a linear probe on one account's answers
learns as well as on the originals), but answers of two accounts no longer pool without first
fitting a map between them on clips asked through both.
"""

from __future__ import annotations

import numpy as np

from speechmimic.defences.base import Defence, rng_for
from speechmimic.errors import InputError


class Transform(Defence):
    kind = "transform"
    options = {
        "kind": (str, "rotate", "rotate (orthogonal matrix) or shuffle (pad and permute dimensions)"),
        "pad": (int, 0, "shuffle: dimensions of padding noise appended before the permutation"),
        "seed": (int, 0, "the owner's secret: with the account, it draws each account's transform"),
    }

    def check(self):
        if self.o["kind"] not in ("rotate", "shuffle"):
            raise InputError(f"defence transform: kind must be rotate or shuffle, got {self.o['kind']!r}")
        if self.o["pad"] < 0:
            raise InputError("defence transform: pad must be >= 0")
        self._cache: dict[tuple[str, str, int], tuple] = {}

    def _of(self, account: str, layer: str, dim: int):
        key = (account, layer, dim)
        if key not in self._cache:
            rng = rng_for(self.o["seed"], "transform", account, layer, dim)
            if self.o["kind"] == "rotate":
                q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
                self._cache[key] = ((q * np.sign(np.diag(r))).astype(np.float32),)  # Haar-uniform
            else:
                pad = self.o["pad"]
                mix = rng.standard_normal((dim, pad)).astype(np.float32) / np.sqrt(max(dim, 1))
                self._cache[key] = (rng.permutation(dim + pad), mix)
        return self._cache[key]

    def answer(self, q, answer, state):
        out = {}
        for name, frames in answer.items():
            x = np.asarray(frames, np.float32)
            if self.o["kind"] == "rotate":
                (rot,) = self._of(q.account, name, x.shape[1])
                out[name] = x @ rot
            else:
                perm, mix = self._of(q.account, name, x.shape[1])
                # padding a deterministic function of the frame: looks like signal, carries nothing new
                padded = np.concatenate([x, np.tanh(x @ mix)], axis=1)
                out[name] = np.ascontiguousarray(padded[:, perm])
        return out
