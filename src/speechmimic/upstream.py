"""The upstream interface (s3prl's convention) over students and targets alike.

``load_upstream(path_or_spec)`` returns an ``nn.Module`` whose ``forward(list[Tensor])`` takes 16 kHz
mono float waveforms and returns ``{"hidden_states": [Tensor (B, T, D), ...]}``, with
``downsample_rate`` (samples per frame) and ``hidden_state_names`` attributes. Clips shorter than the
longest in the batch are zero-padded in the output; each clip is encoded on its own so padding
never changes a clip's features.

- An extracted student: its own states (front end, each transformer layer) and its prediction of
  every target layer (the stolen representations), all at the heads' frame rate (student states
  are repeated to that rate).
- A target spec (``hf:...``, ``resemblyzer...``): the layers its API returns.
- ``mfcc`` or ``fbank``: the learning-free baselines of :mod:`speechmimic.baselines` (39-d MFCC with
  deltas, or 80 log-mel; one state at 100 Hz); ``mfcc+cmvn`` / ``fbank+cmvn`` add per-utterance
  CMVN. These names win over a folder of the same name: write ``./mfcc`` for the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speechmimic.baselines import BASELINES
from speechmimic.student import CONFIG_NAME, SAMPLE_RATE, Student, infer
from speechmimic.targets import load_target


def _pad_stack(seqs: list[torch.Tensor]) -> torch.Tensor:
    t = max(s.shape[0] for s in seqs)
    return torch.stack([F.pad(s, (0, 0, 0, t - s.shape[0])) for s in seqs])


class StudentUpstream(nn.Module):
    def __init__(self, student: Student, config: dict):
        super().__init__()
        self.student = student.eval()
        self.config = config
        ratios = {h.ratio for h in student.heads.values()} or {1}
        self.ratio = max(ratios)  # heads share the target's frame rate in practice
        self.downsample_rate = student.cfg.hop // self.ratio
        n = student.cfg.layers
        self.hidden_state_names = (
            ["student.frontend"]
            + [f"student.layer{i + 1}" for i in range(n)]
            + [f"pred.{name}" for name in student.heads]
        )

    @torch.no_grad()
    def forward(self, wavs: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        per_clip: list[list[torch.Tensor]] = []
        for wav in wavs:
            wav = wav.float().reshape(-1)
            n = int(self.student.cfg.num_frames(wav.shape[0])) * self.ratio
            states, preds = infer(self.student, wav, {name: n for name in self.student.heads})
            feats = [s.repeat_interleave(self.ratio, 0)[:n] for s in states] + list(preds.values())
            per_clip.append(feats)
        return {"hidden_states": [_pad_stack([c[i] for c in per_clip]) for i in range(len(per_clip[0]))]}


class TargetUpstream(nn.Module):
    def __init__(self, spec: str, device: str = "cpu"):
        super().__init__()
        self.target = load_target(spec, device=device)
        self.downsample_rate = round(SAMPLE_RATE / self.target.frame_rate)
        self.hidden_state_names = list(self.target.layers)

    @torch.no_grad()
    def forward(self, wavs: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        out = self.target([w.float().reshape(-1).cpu().numpy() for w in wavs])
        return {
            "hidden_states": [
                _pad_stack([torch.from_numpy(o[name]) for o in out]) for name in self.hidden_state_names
            ]
        }


def load_upstream(path_or_spec: str | Path, device: str = "cpu") -> nn.Module:
    """An upstream from an extracted student's directory, any target spec, or a baseline (``mfcc``...)."""
    if isinstance(path_or_spec, str) and path_or_spec in BASELINES:
        return BASELINES[path_or_spec]().to(device)
    path = Path(path_or_spec)
    if (path / CONFIG_NAME).exists():
        try:
            student, config = Student.load(path)
            return StudentUpstream(student, config).to(device)
        except ValueError:
            pass  # a config.json that is not ours: e.g. a transformers checkpoint directory
        return TargetUpstream(f"hf:{path}", device)
    return TargetUpstream(str(path_or_spec), device)
