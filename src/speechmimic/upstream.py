"""The upstream interface (s3prl's convention) over students and targets alike.

``load_upstream(path_or_spec)`` returns an ``nn.Module`` whose ``forward(list[Tensor])`` takes 16 kHz
mono float waveforms and returns ``{"hidden_states": [Tensor (B, T, D), ...]}``, with
``downsample_rate`` (samples per frame) and ``hidden_state_names`` attributes, and s3prl's
``get_downsample_rates(key)`` for every key it returns. Clips shorter than the longest in the batch
are zero-padded in the output; each clip is encoded on its own so padding never changes a clip's
features. A student or a baseline gives a clip of N samples at least ``round(N / downsample_rate)``
frames, the count s3prl's ``Featurizer`` keeps, and at most two more; a target gives what its API
answers. :mod:`speechmimic.s3prl_expert` wraps any of these for s3prl's own runner, with exactly
that count.

- An extracted student: its own states (front end, each transformer layer) and its prediction of
  every target layer (the stolen representations), all at the heads' frame rate (student states
  are repeated to that rate); besides ``hidden_states`` (all of them) the output holds ``student``
  (its own states, of its width) and ``pred`` (the predictions, of the target's widths), for
  s3prl's weighted sum, which needs states of one width. In training mode
  (``.train()``, as s3prl's runner sets for fine-tuning) gradients reach the student's weights; a
  loaded upstream starts in eval mode, without them. A clip longer than ``chunk_seconds`` is
  encoded in overlapping windows, so memory stays bounded on hour-long recordings (see
  :func:`speechmimic.student.infer` for the stitching and how close it is to encoding it whole).
- A target (a spec ``hf:...``, ``resemblyzer...``, or a :class:`~speechmimic.targets.Target`): the
  layers its API returns, bought through a ledger (``ledger=``): every clip is paid once and a
  rerun, or another probe of the same audio, reads the stored answer. A target answers a clip
  whole; one that declares ``max_samples`` refuses a longer clip before anything is paid.
- ``mfcc`` or ``fbank``: the learning-free baselines of :mod:`speechmimic.baselines` (39-d MFCC with
  deltas, or 80 log-mel; one state at 100 Hz); ``mfcc+cmvn`` / ``fbank+cmvn`` add per-utterance
  CMVN. These names win over a folder of the same name: write ``./mfcc`` for the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speechmimic.audio import SAMPLE_RATE
from speechmimic.baselines import BASELINES
from speechmimic.defences import load_target, parse_chain
from speechmimic.errors import InputError
from speechmimic.ledger import Ledger, content_key
from speechmimic.student import CHUNK_SECONDS, CONFIG_NAME, Student, infer
from speechmimic.targets import Target


class LedgerRequired(InputError):
    """A target was named without a ledger to record what its answers cost."""


def _pad_stack(seqs: list[torch.Tensor]) -> torch.Tensor:
    t = max(s.shape[0] for s in seqs)
    return torch.stack([F.pad(s, (0, 0, 0, t - s.shape[0])) for s in seqs])


class _Upstream(nn.Module):
    downsample_rate: int
    keys: tuple[str, ...] = ("hidden_states",)

    def get_downsample_rates(self, key: str) -> int:
        """s3prl's contract: samples per frame of the features under ``key`` (all keys share it)."""
        if key not in self.keys:
            raise KeyError(f"{key!r} is not among this upstream's features: {', '.join(self.keys)}")
        return self.downsample_rate


class StudentUpstream(_Upstream):
    keys = ("hidden_states", "student", "pred")

    def __init__(self, student: Student, config: dict, chunk_seconds: float | None = CHUNK_SECONDS):
        super().__init__()
        self.student = student.eval()
        self.config = config
        self.chunk_seconds = chunk_seconds
        ratios = {h.ratio for h in student.heads.values()} or {1}
        self.ratio = max(ratios)  # heads share the target's frame rate in practice
        self.downsample_rate = student.cfg.hop // self.ratio
        n = student.cfg.layers
        self.hidden_state_names = (
            ["student.frontend"]
            + [f"student.layer{i + 1}" for i in range(n)]
            + [f"pred.{name}" for name in student.heads]
        )
        self.eval()

    def forward(self, wavs: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        per_clip: list[list[torch.Tensor]] = []
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            for wav in wavs:
                wav = wav.float().reshape(-1)
                n = int(self.student.cfg.num_frames(wav.shape[0])) * self.ratio
                states, preds = infer(
                    self.student, wav, {name: n for name in self.student.heads}, self.chunk_seconds
                )
                feats = [s.repeat_interleave(self.ratio, 0)[:n] for s in states] + list(preds.values())
                per_clip.append(feats)
        hidden = [_pad_stack([c[i] for c in per_clip]) for i in range(len(per_clip[0]))]
        own = self.student.cfg.layers + 1
        return {"hidden_states": hidden, "student": hidden[:own], "pred": hidden[own:]}


class TargetUpstream(_Upstream):
    """A target's answers as an upstream, bought through ``ledger``; a spec is loaded only when an
    answer is missing from the ledger, so a rerun needs neither the model nor the API."""

    def __init__(self, target: Target | str, ledger: Ledger, device: str = "cpu"):
        super().__init__()
        self._target = None if isinstance(target, str) else target
        self.spec = target if isinstance(target, str) else target.spec
        self.ledger = ledger
        self.device = device

    @property
    def target(self) -> Target:
        if self._target is None:
            self._target = load_target(self.spec, device=self.device)
        return self._target

    def _describe(self, key: str):
        # A ledger bound to the target already says what it returns: no need to load the model.
        header = self.ledger.header
        if header is not None and header["target"] == self.spec:
            if header[key] is None and key == "frame_rate" and len(self.ledger):
                # an API that does not say its rate: read it off the answers
                return max(self.ledger.frame_rates().values())
            if header[key] is not None:
                return header[key]
        return getattr(self.target, key)

    @property
    def downsample_rate(self) -> int:
        return round(SAMPLE_RATE / self._describe("frame_rate"))

    @property
    def hidden_state_names(self) -> list[str]:
        return list(self._describe("layers"))

    @torch.no_grad()
    def forward(self, wavs: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        arrays = [w.float().reshape(-1).cpu().numpy() for w in wavs]
        keys = [content_key(a) for a in arrays]
        unpaid = [(k, a) for k, a in zip(keys, arrays, strict=True) if k not in self.ledger]
        if unpaid:
            # A target answers a clip whole: one it cannot take is refused before anything is paid.
            limit = getattr(self.target, "max_samples", None)
            longest = max(len(a) for _, a in unpaid)
            if limit is not None and longest > limit:
                raise InputError(
                    f"a clip of {longest / SAMPLE_RATE:.1f} s is longer than {self.spec} takes "
                    f"({limit / SAMPLE_RATE:.1f} s at most): cut long recordings into segments first "
                    "(speechmimic corpus scan --max-seconds N)"
                )
            self.ledger.query(self.target, [(k, lambda a=a: a) for k, a in unpaid], progress=False)
        out = [self.ledger.get(k) for k in keys]
        return {
            "hidden_states": [
                _pad_stack([torch.from_numpy(o[name]) for o in out]) for name in self.hidden_state_names
            ]
        }


def load_upstream(
    path_or_spec: str | os.PathLike | Target,
    device: str = "cpu",
    ledger: Ledger | str | os.PathLike | None = None,
    chunk_seconds: float | None = CHUNK_SECONDS,
) -> nn.Module:
    """An upstream from an extracted student's directory, a baseline (``mfcc``...), or a target (a
    spec, a transformers checkpoint folder, or a Target) whose answers ``ledger`` records.
    ``chunk_seconds``: a student encodes longer clips in windows of that length (None: whole)."""
    if isinstance(path_or_spec, str) and path_or_spec in BASELINES:
        return BASELINES[path_or_spec]().to(device)
    target = path_or_spec
    if not isinstance(path_or_spec, Target):
        path = Path(path_or_spec)
        target = str(path_or_spec)
        if (path / CONFIG_NAME).exists():
            try:
                student, config = Student.load(path)
                return StudentUpstream(student, config, chunk_seconds).to(device)
            except ValueError:
                target = f"hf:{path}"  # a config.json that is not ours: a transformers checkpoint
        elif not path.exists() and ledger is None:
            try:
                parse_chain(target)
            except ValueError as e:  # a mistyped folder would otherwise be asked for a ledger
                raise InputError(
                    f"{target!r} is no such folder (a student), and not a target spec: {e}"
                ) from None
    if ledger is None:
        raise LedgerRequired(
            f"{getattr(target, 'spec', target)} is a target: its answers are paid for, so they are "
            "recorded in a ledger; pass ledger=Ledger(DIR) (on the command line: --ledger DIR)"
        )
    return TargetUpstream(target, ledger if isinstance(ledger, Ledger) else Ledger(ledger), device)
