"""The one contract every target backend honours, and nothing the attack may see beyond it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from speechmimic.errors import InputError, SpeechmimicError


@runtime_checkable
class Target(Protocol):
    """A black-box speech encoder behind an embedding API.

    ``__call__`` takes a batch of 16 kHz mono float32 waveforms and returns, for each clip, a dict
    ``{layer_name: frames (T, D) float32}`` with one entry per layer the API returns. ``keys`` are
    the clips' idempotency keys (their content keys, from the ledger): a remote API that honours
    them does not charge twice for a request sent again after a crash, so a wrapper (a defence, an
    HTTP client) passes them on; a local model has nothing to charge and ignores them. ``frame_rate``
    is the rate of those frames in Hz. ``spec`` is the string that rebuilds the target with
    :func:`speechmimic.targets.load_backend`. ``padding`` names the batching policy ("per_clip" or
    "bucket"): padding changes the outputs of transformer encoders, so it is recorded with every
    paid query. ``min_samples`` is the shortest clip the target accepts (its receptive field). A
    target may also declare ``max_samples``, the longest clip it answers (an API's request limit):
    a longer clip is refused with a clear error before it is sent (absent or None: no limit).

    A remote API may not say what it returns: its ``layers`` are then ``None`` and its
    ``frame_rate`` ``None`` until answers show them (the ledger learns both from the answers).

    The attack code reads only the returned arrays and these attributes; never weights, configs
    or layer counts of the model behind the API.
    """

    spec: str
    frame_rate: float | None
    layers: list[str] | None
    padding: str
    min_samples: int

    def __call__(
        self, wavs: list[np.ndarray], keys: list[str] | None = None
    ) -> list[dict[str, np.ndarray]]: ...


class TargetError(SpeechmimicError, RuntimeError):
    """A target that could not answer (a remote API refusing the key, out of quota, unreachable)."""


class ClipRefused(TargetError):
    """The target refuses one clip for what it is (too long, too short, undecodable): that clip's
    failure, never the run's. ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class PartialAnswers(TargetError):
    """Some clips of a batch were answered and some not: ``answers[i]`` is clip i's answer or
    ``None``, ``errors[i]`` the :class:`TargetError` of each unanswered clip. Raised so the caller
    keeps what was answered (and paid for) before it handles the rest."""

    def __init__(self, answers: list[dict[str, np.ndarray] | None], errors: dict[int, TargetError]):
        self.answers = answers
        self.errors = errors
        first = errors[min(errors)]
        super().__init__(f"{len(errors)} of {len(answers)} clips unanswered; first: {first}")


def as_clip(wav: np.ndarray, min_samples: int) -> np.ndarray:
    """A waveform as the float32 1-D array a target accepts; ValueError if it is not one."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected a mono 1-D waveform, got shape {wav.shape}")
    if len(wav) < min_samples:
        raise ValueError(
            f"clip of {len(wav)} samples is shorter than the model's receptive field ({min_samples} samples)"
        )
    return wav


def parse_layers(value: str | None, count: int, first: int, default: int) -> list[int]:
    """Resolve a ``layers`` option to sorted-by-request, de-duplicated indices in ``[first, first + count)``.

    ``None`` gives ``[default]``; ``all`` gives every index; otherwise a comma list where negative
    entries count from the end (``-1`` is the last).
    """
    if value is None:
        return [default]
    if value.strip() == "all":
        return list(range(first, first + count))
    last = first + count - 1
    indices: list[int] = []
    for item in value.split(","):
        try:
            index = int(item)
        except ValueError:
            raise InputError(
                f"layers must be 'all' or a comma list of integers in [{first}, {last}] "
                f"(or [-{count}, -1]), got {value!r}"
            ) from None
        resolved = first + count + index if index < 0 else index
        if not first <= resolved <= last:
            raise InputError(f"layer {index} out of range: valid are {first}..{last} or -{count}..-1")
        if resolved not in indices:
            indices.append(resolved)
    return indices
