"""Output perturbation: what every answer loses, whoever asks.

- ``noise?snr=DB&seed=S``: Gaussian noise on every frame, at ``snr`` dB below each layer's power in
  that answer; a function of (seed, account, clip), so a repeated query gets the same noise.
- ``round?step=X``: every value rounded to a multiple of ``step`` (an API returning fewer digits).
- ``layers?keep=NAMES``: only the named layers are answered (comma list of the layer names the
  target returns).
"""

from __future__ import annotations

import numpy as np

from speechmimic.defences.base import Defence, Query, rms, rng_for
from speechmimic.errors import InputError


class Noise(Defence):
    kind = "noise"
    options = {
        "snr": (float, 20.0, "signal-to-noise ratio of each answered layer, dB"),
        "seed": (int, 0, "seed of the noise"),
    }

    def answer(self, q: Query, answer, state):
        out = {}
        for name, frames in answer.items():
            x = np.asarray(frames, np.float32)
            sigma = rms(x) / 10 ** (self.o["snr"] / 20)
            rng = rng_for(self.o["seed"], q.account, q.digest, name)
            out[name] = (x + sigma * rng.standard_normal(x.shape)).astype(np.float32)
        return out


class Round(Defence):
    kind = "round"
    options = {"step": (float, 0.1, "answered values are multiples of this")}

    def check(self):
        if not self.o["step"] > 0:
            raise InputError(f"defence round: step must be positive, got {self.o['step']}")

    def answer(self, q, answer, state):
        step = self.o["step"]
        return {
            k: (np.round(np.asarray(v, np.float32) / step) * step).astype(np.float32)
            for k, v in answer.items()
        }


class Layers(Defence):
    kind = "layers"
    options = {"keep": (str, None, "comma list of the layer names to answer")}

    def check(self):
        if not self.o["keep"]:
            raise InputError("defence layers needs keep=NAME[,NAME...]: the layers still answered")
        self.keep = [k.strip() for k in self.o["keep"].split(",") if k.strip()]

    def layers(self, layers):
        if layers is not None:
            missing = [k for k in self.keep if k not in layers]
            if missing:
                raise InputError(f"defence layers: {missing} not among the target's layers {layers}")
        return list(self.keep)

    def answer(self, q, answer, state):
        return {k: answer[k] for k in self.keep}
