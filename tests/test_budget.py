"""Budgets: what the text means, and the one test of 'within' that selection and the ledger share."""

from __future__ import annotations

import pytest

from speechmimic.budget import Budget, take_within
from speechmimic.corpus import Clip


def _clips(*durations: float) -> list[Clip]:
    return [Clip(f"c{i}", f"/x/{i}.wav", 16000, int(d * 16000), d) for i, d in enumerate(durations)]


def test_parse():
    assert Budget.parse("25%", pool_seconds=80).seconds == pytest.approx(20)
    assert Budget.parse("90s") == Budget(seconds=90) and Budget.parse("2m") == Budget(seconds=120)
    assert Budget.parse("1h") == Budget(seconds=3600) and Budget.parse("7") == Budget(clips=7)
    with pytest.raises(ValueError, match="bad budget"):
        Budget.parse("lots")
    with pytest.raises(ValueError, match="needs the pool"):
        Budget.parse("5%")


def test_allows_and_take_within():
    budget = Budget(clips=3, seconds=10.0)
    assert budget.allows(3, 10.0) and not budget.allows(4, 1.0) and not budget.allows(1, 10.5)
    assert Budget().allows(10**9, 1e12)
    # 0.1 + 0.2 > 0.3 in floats: a clip that fits exactly is not refused for rounding.
    assert Budget(seconds=0.3).allows(2, 0.1 + 0.2)
    clips = _clips(4.0, 7.0, 3.0, 2.0, 1.0)
    assert take_within(clips, [0, 1, 2, 3, 4], Budget(seconds=10.0)) == [0, 2, 3, 4]  # 7 s does not fit
    assert take_within(clips, [4, 3, 2, 1, 0], Budget(clips=2)) == [4, 3]
