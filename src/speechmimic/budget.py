"""What may be spent on queries: a cap in clips and/or seconds of audio.

One :class:`Budget` guards a run twice, with one rule (:func:`take_within`): selection never chooses
beyond it, and the ledger's request (:func:`speechmimic.ledger.query_clips`) refuses to pay beyond
it, so a strategy that overshoots is stopped before the target is asked. A ledger may also carry a
lifetime cap of its own (:class:`speechmimic.ledger.Ledger`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from speechmimic.corpus import Clip
from speechmimic.errors import InputError

# Float sums of clip durations: a clip that fits exactly must not be refused for rounding.
_TOLERANCE = 1e-9
# More audio than any speech corpus holds (the largest are under a million hours): a typo, not a cap.
MAX_HOURS = 1e6
_SCALES = {"s": 1, "m": 60, "h": 3600}
_FORMS = "use N (clips), Ns/Nm/Nh (audio) or N% (of the pool's seconds)"


def check(text: str) -> tuple[float, str]:
    """``text`` as (amount, unit), unit one of ``""`` (clips), ``s``, ``m``, ``h``, ``%``; ValueError
    saying why for a budget that cannot be meant: not a number, zero (selects nothing), negative,
    over 100% (a share of the pool cannot exceed it), a fractional clip count, or more than
    :data:`MAX_HOURS` of audio. A time or clip budget above the pool's size is accepted: it buys
    the whole pool (:func:`speechmimic.experiment.covers`)."""
    shown = text
    text = text.strip().lower()
    unit = text[-1] if text[-1:] in ("%", *_SCALES) else ""
    try:
        amount = float(text[: len(text) - len(unit)])
    except ValueError:
        raise InputError(f"bad budget {shown!r}: {_FORMS}") from None
    if not math.isfinite(amount):
        raise InputError(f"bad budget {shown!r}: not a finite amount; {_FORMS}")
    if amount < 0:
        raise InputError(
            f"budget {shown!r} is negative: a budget is what may be spent, give a positive amount"
        )
    if amount == 0:
        raise InputError(f"budget {shown!r} buys nothing; {_FORMS}, N > 0")
    if unit == "%" and amount > 100:
        raise InputError(
            f"budget {shown!r} is more than the whole pool: a percentage is a share of it, at most 100%"
        )
    if unit == "" and amount != int(amount):
        raise InputError(f"bad budget {shown!r}: a number of clips is whole; for audio add s, m or h")
    if unit in _SCALES and amount * _SCALES[unit] > MAX_HOURS * 3600:
        raise InputError(
            f"budget {shown!r} is {amount * _SCALES[unit] / 3600:.3g} hours of audio, more than any speech "
            f"corpus holds (at most {MAX_HOURS:.0e} h): a unit or an exponent too many?"
        )
    return amount, unit


@dataclass(frozen=True)
class Budget:
    """What may be spent: ``clips`` and/or ``seconds`` (``None`` = no cap on that axis)."""

    clips: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str, pool_seconds: float | None = None) -> Budget:
        """``"200"`` clips, ``"600s"`` / ``"10m"`` / ``"1h"`` of audio, or ``"25%"`` of the pool's
        seconds; what :func:`check` refuses is refused."""
        amount, unit = check(text)
        if unit == "%":
            if pool_seconds is None:
                raise InputError(
                    f"budget {text!r}: a percentage needs the pool; give Ns/Nm/Nh or N clips here"
                )
            return cls(seconds=amount / 100 * pool_seconds)
        if unit:
            return cls(seconds=amount * _SCALES[unit])
        return cls(clips=int(amount))

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
