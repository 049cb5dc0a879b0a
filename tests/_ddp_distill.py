"""A stage-2 run that dies: ``python _ddp_distill.py MANIFEST LEDGER OUT STEPS KILL_AT`` (under torchrun).

The same settings as the test's ``speechmimic distill`` command; rank 1 (or the only rank) kills itself
with SIGKILL after step KILL_AT, as a machine that loses power would: nothing is flushed or closed.
"""

from __future__ import annotations

import os
import signal
import sys

from speechmimic import distributed
from speechmimic.corpus import read_manifest
from speechmimic.distill import DistillConfig, distill
from speechmimic.ledger import Ledger

manifest, ledger, out, steps, kill_at = sys.argv[1:6]
distributed.init("cpu")
victim = min(1, distributed.world() - 1)


def on_step(step: int, loss: float) -> None:
    if step == int(kill_at) and distributed.rank() == victim:
        os.kill(os.getpid(), signal.SIGKILL)


cfg = DistillConfig(steps=int(steps), warmup=2, batch_seconds=8.0, checkpoint_every=5)
distill(read_manifest(manifest), Ledger(ledger), out, cfg, preset="tiny", progress=False, on_step=on_step)
