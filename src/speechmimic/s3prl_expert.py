"""s3prl's upstream contract, exactly, for anything :func:`~speechmimic.upstream.load_upstream` takes.

s3prl's runner (``run_downstream.py -u customized_upstream -k CKPT [-g CONFIG]``, once s3prl's
``upstream/example/expert.py`` imports this class) builds ``UpstreamExpert(ckpt=CKPT,
model_config=CONFIG, refresh=...)``, moves it to its device and reads ``forward(wavs)[key]`` through
its ``Featurizer``, which asks ``get_downsample_rates(key)`` and keeps ``round(N / rate)`` frames of a
clip of N samples.

- ``ckpt``: an extracted student's folder, a baseline (``mfcc``, ``fbank``...), a target spec or a
  transformers checkpoint folder.
- ``model_config``: for a target, the ledger folder its answers are bought through (required: a
  target's answers cost queries). s3prl's ``Featurizer`` sends one second of random noise through
  the upstream when it is built: through a target that is one paid second, recorded in the ledger.

Features: ``hidden_states`` is one group of equal width, as s3prl's weighted sum needs: every state
if they share a width, else a student's predictions of the target's layers (the stolen
representations); a student also returns ``student`` (its own states) and ``pred``; every upstream
returns ``last_hidden_state``. When no group has one width (a target returning layers of several
widths) ``hidden_states`` is every state, for s3prl's ``-l INDEX`` to pick one, and a note says so.
Every clip has exactly ``round(N / rate)`` frames: frames past that
are dropped (a student's last frames cover the clip's end), and a target whose frames stop short of
the clip's end (HuBERT's do, by one) has its last frame repeated; clips shorter than the batch's
longest are zero-padded after their own frames.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from speechmimic.upstream import LedgerRequired, load_upstream


def _fit(frames: torch.Tensor, n: int) -> torch.Tensor:
    """(T, D) -> exactly (n, D): cut, or the last frame repeated."""
    if frames.shape[0] >= n:
        return frames[:n]
    return torch.cat([frames, frames[-1:].expand(n - frames.shape[0], -1)])


def _stack(clips: list[torch.Tensor]) -> torch.Tensor:
    t = max(c.shape[0] for c in clips)
    return torch.stack([F.pad(c, (0, 0, 0, t - c.shape[0])) for c in clips])


class UpstreamExpert(nn.Module):
    """``UpstreamExpert(ckpt, model_config=None, **kwargs)``, the signature s3prl's runner calls."""

    def __init__(self, ckpt: str, model_config: str | None = None, **kwargs):
        super().__init__()
        self.name = "[speechmimic UpstreamExpert]"
        try:
            self.upstream = load_upstream(ckpt, ledger=model_config or None)
        except LedgerRequired:
            raise LedgerRequired(
                f"{ckpt} is a target: its answers are paid for and recorded in a ledger; give the "
                "ledger's folder as model_config (run_downstream.py -g LEDGER_DIR)"
            ) from None
        self._warned = False
        self.downsample_rate = int(self.upstream.downsample_rate)
        self.hidden_state_names = list(self.upstream.hidden_state_names)
        self.keys = ("hidden_states", "last_hidden_state") + tuple(
            k for k in getattr(self.upstream, "keys", ()) if k != "hidden_states"
        )

    def get_downsample_rates(self, key: str) -> int:
        if key not in self.keys:
            raise KeyError(f"{key!r} is not among this upstream's features: {', '.join(self.keys)}")
        return self.downsample_rate

    def forward(self, wavs: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        per_clip = []
        for wav in wavs:  # one clip at a time: each clip's own frame count is then known
            n = round(wav.shape[-1] / self.downsample_rate)
            out = self.upstream([wav])
            per_clip.append({k: [_fit(s[0], n) for s in v] for k, v in out.items() if k in self.keys})
        result = {
            k: [_stack([c[k][i] for c in per_clip]) for i in range(len(per_clip[0][k]))] for k in per_clip[0]
        }
        result["hidden_states"] = self._equal_width(result)
        result["last_hidden_state"] = result["hidden_states"][-1]
        return result

    def _equal_width(self, result: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        for key in ("hidden_states", "pred"):
            states = result.get(key)
            if states and len({s.shape[-1] for s in states}) == 1:
                return states
        if not self._warned:  # s3prl can still take one state of them (-l), not their weighted sum
            widths = ", ".join(
                f"{n} {s.shape[-1]}"
                for n, s in zip(self.hidden_state_names, result["hidden_states"], strict=True)
            )
            print(
                f"{self.name} - this upstream's states differ in width ({widths}): s3prl's weighted sum "
                "needs one width, so select one state (run_downstream.py -l INDEX)",
                file=sys.stderr,
            )
            self._warned = True
        return result["hidden_states"]
