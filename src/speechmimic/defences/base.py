"""What every defence is: a step between a target's answer and the API key that asked for it.

A :class:`Defence` sees one query at a time (:class:`Query`: the waveform, its content digest and the
asking account) and may refuse it before the target runs (:meth:`Defence.admit`) or change its answer
after (:meth:`Defence.answer`). Whatever it must remember per account (coverage, past queries, usage)
it keeps in a state object that :class:`~speechmimic.defences.state.StateStore` saves after every
query, so a restarted server picks up where it stopped. Randomness is a pure function of the
defence's seed, the account and the clip's content (:func:`rng_for`): asking the same clip twice gets
the same answer, so repeating a query never averages noise away.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from speechmimic.errors import InputError
from speechmimic.targets.base import ClipRefused

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Query:
    account: str
    wav: np.ndarray
    digest: str  # sha256 of the float32 samples, as the ledger keys clips

    @property
    def seconds(self) -> float:
        return len(self.wav) / SAMPLE_RATE


def digest(wav: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(wav, dtype=np.float32).tobytes()).hexdigest()


class Refused(ClipRefused):
    """A defence refused the query (quota spent, account flagged): that clip's failure."""


def rng_for(*parts: Any) -> np.random.Generator:
    """A generator seeded by the hash of ``parts`` (seed, account, clip digest, layer...)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:16], "little"))


def rms(x: np.ndarray) -> float:
    """Root mean square of an answer layer's values (0 for an empty one): what noise is scaled to."""
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def utterance_embedding(answer: dict[str, np.ndarray]) -> np.ndarray:
    """One vector per answer: the time mean of every returned layer, side by side (layers in name
    order), float64."""
    return np.concatenate([np.asarray(answer[k], np.float64).mean(0) for k in sorted(answer)])


class Defence:
    """One defence of a chain. Subclasses set ``kind`` and ``options`` (option -> (type, default,
    help)), and override what they need; ``self.o`` holds the parsed options."""

    kind: str = ""
    options: dict[str, tuple[type, Any, str]] = {}
    stateful: bool = False  # keeps per-account state

    def __init__(self, **given: str):
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise InputError(
                f"unknown option {unknown[0]!r} for defence {self.kind!r}; "
                f"valid options: {list(self.options)}"
            )
        self.o: dict[str, Any] = {}
        for name, (kind, default, _help) in self.options.items():
            if name not in given:
                self.o[name] = default
                continue
            try:
                self.o[name] = kind(given[name])
            except ValueError:
                raise InputError(
                    f"defence {self.kind}: option {name} must be a {kind.__name__}, got {given[name]!r}"
                ) from None
        self.given = given
        self.check()

    def check(self) -> None:
        """Raise ValueError for option values out of range."""

    @property
    def spec(self) -> str:
        """The chain segment that rebuilds this defence (every option spelled out)."""
        opts = "&".join(f"{k}={self.o[k]}" for k in self.options if self.o[k] is not None)
        return f"{self.kind}?{opts}" if opts else self.kind

    def layers(self, layers: list[str] | None) -> list[str] | None:
        """The layers answered through this defence, given those it receives."""
        return layers

    def new_state(self) -> dict:
        return {}

    def admit(self, q: Query, state: dict) -> None:
        """Raise :class:`Refused` to refuse ``q`` before the target answers it."""

    def answer(self, q: Query, answer: dict[str, np.ndarray], state: dict) -> dict[str, np.ndarray]:
        return answer

    def status(self, state: dict) -> dict:
        """What an owner reads off an account's state (coverage, alarms, usage)."""
        return {}
