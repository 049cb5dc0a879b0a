"""A PRADA-style extraction detector (Juuti et al., EuroS&P 2019), per API key.

For each new clip a key asks (a clip asked again is not new), the distance from its utterance
embedding (time mean of every returned layer, scaled to unit length) to the nearest of that key's
earlier clips joins the key's set of minimum distances. Natural traffic gives distances close to
normally distributed; queries spread on purpose to cover the space (as informed selection spreads
them) skew it. Once the set holds ``min_queries`` distances, its Shapiro-Wilk W is tested after every
query: W below ``threshold`` raises the alarm, which then ``action=flag`` only records,
``refuse`` turns every later query of the key away, and ``degrade`` answers with noise at ``snr`` dB.
The key's W after every query, and where the alarm came (in queries and audio-seconds), stay in its
state for the owner.
"""

from __future__ import annotations

import numpy as np

from speechmimic.defences.base import Defence, Query, Refused, rms, rng_for, utterance_embedding
from speechmimic.errors import InputError

MAX_TESTED = 5000  # Shapiro-Wilk's p-value approximation holds up to here; the latest are kept


def shapiro_w(distances: np.ndarray) -> float:
    from scipy.stats import shapiro

    d = np.asarray(distances[-MAX_TESTED:], np.float64)
    if np.ptp(d) == 0:
        return 0.0  # all equal: as far from normal as a sample gets
    return float(shapiro(d).statistic)


class Prada(Defence):
    kind = "prada"
    stateful = True
    options = {
        "threshold": (float, 0.90, "alarm when the Shapiro-Wilk W of the minimum distances falls below this"),
        "min_queries": (int, 20, "distances collected before the test starts"),
        "action": (str, "flag", "after an alarm: flag (record only), refuse, or degrade"),
        "snr": (float, 0.0, "degrade: SNR of the noise added after an alarm, dB"),
        "seed": (int, 0, "seed of the degrading noise"),
    }

    def check(self):
        if self.o["action"] not in ("flag", "refuse", "degrade"):
            raise InputError(
                f"defence prada: action must be flag, refuse or degrade, got {self.o['action']!r}"
            )
        if self.o["min_queries"] < 3 or not 0 < self.o["threshold"] <= 1:
            raise InputError("defence prada: min_queries must be >= 3 and threshold in (0, 1]")

    def new_state(self):
        return {
            "embeddings": np.zeros((0, 0), np.float32),
            "digests": np.zeros(0, "U64"),
            "distances": np.zeros(0, np.float64),
            "w": np.zeros(0, np.float64),  # after each new clip; nan before the test starts
            "seconds": np.zeros(0, np.float64),  # audio-seconds asked by then
            "alarm_at": np.int64(-1),  # index of the new clip that raised the alarm
        }

    def admit(self, q: Query, state):
        if int(state["alarm_at"]) >= 0 and self.o["action"] == "refuse" and q.digest not in state["digests"]:
            raise Refused("this key was flagged by the extraction detector")

    def answer(self, q: Query, answer, state):
        if q.digest not in state["digests"]:
            self._observe(q, answer, state)
        if int(state["alarm_at"]) >= 0 and self.o["action"] == "degrade":
            out = {}
            for name, frames in answer.items():
                x = np.asarray(frames, np.float32)
                sigma = rms(x) / 10 ** (self.o["snr"] / 20)
                rng = rng_for(self.o["seed"], "prada", q.account, q.digest, name)
                out[name] = (x + sigma * rng.standard_normal(x.shape)).astype(np.float32)
            return out
        return answer

    def _observe(self, q: Query, answer, state) -> None:
        e = utterance_embedding(answer).astype(np.float32)
        e /= np.linalg.norm(e) + 1e-12
        seen = state["embeddings"]
        if len(seen):
            state["distances"] = np.append(state["distances"], np.linalg.norm(seen - e, axis=1).min())
            state["embeddings"] = np.vstack([seen, e])
        else:
            state["embeddings"] = e[None]
        state["digests"] = np.append(state["digests"], q.digest)
        total = (state["seconds"][-1] if len(state["seconds"]) else 0.0) + q.seconds
        state["seconds"] = np.append(state["seconds"], total)
        d = state["distances"]
        w = shapiro_w(d) if len(d) >= self.o["min_queries"] else np.nan
        state["w"] = np.append(state["w"], w)
        if int(state["alarm_at"]) < 0 and w < self.o["threshold"]:
            state["alarm_at"] = np.int64(len(state["w"]) - 1)

    def status(self, state):
        w = state["w"][~np.isnan(state["w"])]
        at = int(state["alarm_at"])
        return {
            "queries": int(len(state["w"])),
            "w_last": round(float(w[-1]), 4) if len(w) else None,
            "w_min": round(float(w.min()), 4) if len(w) else None,
            "alarm": at >= 0,
            "alarm_after_queries": at + 1 if at >= 0 else None,
            "alarm_after_seconds": round(float(state["seconds"][at]), 2) if at >= 0 else None,
        }
