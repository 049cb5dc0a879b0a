"""The API's own limit, as a defence: ``quota?seconds=N`` answers each key at most N audio-seconds
(clips asked again are free, as the server's idempotency makes them); beyond, every new clip is
refused. The server enforces its quotas itself (:mod:`speechmimic.serve.keys`); this lets an audit
price the same limit in-process."""

from __future__ import annotations

import numpy as np

from speechmimic.defences.base import Defence, Query, Refused
from speechmimic.errors import InputError


class Quota(Defence):
    kind = "quota"
    stateful = True
    options = {"seconds": (float, None, "audio-seconds each key may have answered")}

    def check(self):
        if self.o["seconds"] is None or self.o["seconds"] <= 0:
            raise InputError("defence quota needs seconds=N (positive): the audio each key may ask")

    def new_state(self):
        return {"seconds": np.float64(0.0), "digests": np.zeros(0, "U64")}

    def admit(self, q: Query, state):
        if q.digest in state["digests"]:
            return
        if float(state["seconds"]) + q.seconds > self.o["seconds"]:
            raise Refused(f"quota of {self.o['seconds']:g} audio-seconds per key is spent")
        # charged on admission, so clips of one batch cannot pass the quota together
        state["seconds"] = np.float64(float(state["seconds"]) + q.seconds)
        state["digests"] = np.append(state["digests"], q.digest)

    def status(self, state):
        return {"seconds": round(float(state["seconds"]), 2)}
