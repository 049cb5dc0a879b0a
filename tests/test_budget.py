"""Budgets: what the text means, and the one test of 'within' that selection and the ledger share."""

from __future__ import annotations

import pytest

from speechmimic.budget import Budget, take_within
from speechmimic.cli import main
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
    assert Budget.parse("100%", pool_seconds=80) == Budget(seconds=80)
    assert Budget.parse("1e3") == Budget(clips=1000)
    # A budget above the pool is meant: it buys the whole pool (experiment.covers).
    assert Budget.parse("10h", pool_seconds=80) == Budget(seconds=36000)


FORMS = "use N (clips), Ns/Nm/Nh (audio) or N% (of the pool's seconds)"


@pytest.mark.parametrize(
    "text,message",
    [
        ("200%", "budget '200%' is more than the whole pool: a percentage is a share of it, at most 100%"),
        (
            "1e9h",
            "budget '1e9h' is 1e+09 hours of audio, more than any speech corpus holds (at most 1e+06 h): "
            "a unit or an exponent too many?",
        ),
        ("0", f"budget '0' buys nothing; {FORMS}, N > 0"),
        ("0%", f"budget '0%' buys nothing; {FORMS}, N > 0"),
        ("-5%", "budget '-5%' is negative: a budget is what may be spent, give a positive amount"),
        ("1.5", "bad budget '1.5': a number of clips is whole; for audio add s, m or h"),
        ("infh", f"bad budget 'infh': not a finite amount; {FORMS}"),
        ("lots", f"bad budget 'lots': {FORMS}"),
    ],
)
def test_budgets_that_cannot_be_meant_are_refused(text, message):
    with pytest.raises(ValueError) as e:
        Budget.parse(text, pool_seconds=80)
    assert str(e.value) == message


NEGATIVE = "budget '-5%' is negative: a budget is what may be spent, give a positive amount"


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--budget", "200%"],
            "budget '200%' is more than the whole pool: a percentage is a share of it, at most 100%",
        ),
        (["--budget=-5%"], NEGATIVE),
        (["--budget", "-5%"], NEGATIVE),  # argparse alone: "argument --budget: expected one argument"
        (["--budget", "0"], f"budget '0' buys nothing; {FORMS}, N > 0"),
    ],
)
def test_the_command_line_refuses_them_before_doing_anything(tmp_path, capsys, argv, message):
    out = tmp_path / "selected.jsonl"
    with pytest.raises(SystemExit) as e:
        main(["select", "--manifest", str(tmp_path / "pool.jsonl"), "--out", str(out), *argv])
    assert e.value.code == 2 and not out.exists()
    assert (
        capsys.readouterr().err.splitlines()[-1] == f"speechmimic select: error: argument --budget: {message}"
    )


def test_allows_and_take_within():
    budget = Budget(clips=3, seconds=10.0)
    assert budget.allows(3, 10.0) and not budget.allows(4, 1.0) and not budget.allows(1, 10.5)
    assert Budget().allows(10**9, 1e12)
    # 0.1 + 0.2 > 0.3 in floats: a clip that fits exactly is not refused for rounding.
    assert Budget(seconds=0.3).allows(2, 0.1 + 0.2)
    clips = _clips(4.0, 7.0, 3.0, 2.0, 1.0)
    assert take_within(clips, [0, 1, 2, 3, 4], Budget(seconds=10.0)) == [0, 2, 3, 4]  # 7 s does not fit
    assert take_within(clips, [4, 3, 2, 1, 0], Budget(clips=2)) == [4, 3]
