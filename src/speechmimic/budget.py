"""What may be spent on queries: a cap in clips and/or seconds of audio.

One :class:`Budget` guards a run twice, with one rule (:func:`take_within`): selection never chooses
beyond it, and the ledger's request (:func:`speechmimic.ledger.query_clips`) refuses to pay beyond
it, so a strategy that overshoots is stopped before the target is asked. A ledger may also carry a
lifetime cap of its own (:class:`speechmimic.ledger.Ledger`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from speechmimic.corpus import Clip

# Float sums of clip durations: a clip that fits exactly must not be refused for rounding.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Budget:
    """What may be spent: ``clips`` and/or ``seconds`` (``None`` = no cap on that axis)."""

    clips: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str, pool_seconds: float | None = None) -> Budget:
        """``"200"`` clips, ``"600s"`` / ``"10m"`` / ``"1h"`` of audio, or ``"25%"`` of the pool's seconds."""
        text = text.strip().lower()
        try:
            if text.endswith("%"):
                if pool_seconds is None:
                    raise ValueError("a percentage budget needs the pool")
                return cls(seconds=float(text[:-1]) / 100 * pool_seconds)
            for suffix, scale in (("s", 1), ("m", 60), ("h", 3600)):
                if text.endswith(suffix):
                    return cls(seconds=float(text[:-1]) * scale)
            return cls(clips=int(text))
        except ValueError as e:
            raise ValueError(f"bad budget {text!r}: use N (clips), Ns/Nm/Nh (audio) or N% ({e})") from None

    def allows(self, clips: int, seconds: float) -> bool:
        """Whether spending ``clips`` clips of ``seconds`` in total stays within the budget."""
        if self.clips is not None and clips > self.clips:
            return False
        return self.seconds is None or seconds <= self.seconds + _TOLERANCE

    def to_dict(self) -> dict:
        return {"clips": self.clips, "seconds": self.seconds}


def take_within(clips: Sequence[Clip], ranking: Sequence[int], budget: Budget) -> list[int]:
    """Walk ``ranking`` and keep each clip that still fits the budget."""
    chosen, seconds = [], 0.0
    for i in ranking:
        if budget.clips is not None and len(chosen) >= budget.clips:
            break
        if not budget.allows(len(chosen) + 1, seconds + clips[i].duration):
            continue
        chosen.append(i)
        seconds += clips[i].duration
    return chosen
