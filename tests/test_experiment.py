"""The experiment runner: a grid of extractions, each cached and resumable, and its summary."""

from __future__ import annotations

import pytest

from speechmimic import experiment
from speechmimic.distill import DistillConfig
from speechmimic.experiment import Experiment, Grid
from speechmimic.pretrain import PretrainConfig
from speechmimic.report import grid_table, plot_grid
from speechmimic.student import Student

SPEC = "resemblyzer?layers=2"


def _grid(steps: int = 2, **kw) -> Grid:
    return Grid(
        targets={"resemblyzer": SPEC},
        budgets=["25%", "100%"],
        strategies=["random", "longest"],
        preset="tiny",
        distill=DistillConfig(steps=steps, warmup=1, batch_seconds=10),
        **kw,
    )


def test_cells_cover_the_grid_and_a_whole_pool_budget_once(speech_clips):
    pool, _ = speech_clips
    cells = _grid(seeds=[0, 1]).cells(pool)
    assert [c.name for c in cells] == [
        "resemblyzer/25pct/random-scratch-s0",
        "resemblyzer/25pct/longest-scratch-s0",
        "resemblyzer/25pct/random-scratch-s1",
        "resemblyzer/25pct/longest-scratch-s1",
        "resemblyzer/100pct/random-scratch-s0",
        "resemblyzer/100pct/random-scratch-s1",
    ]
    with pytest.raises(ValueError, match="stage-1 config"):
        _grid(stage1=[True])
    with pytest.raises(ValueError, match="rank by stage-1 scores"):
        Grid(targets={"r": SPEC}, budgets=["5%"], strategies=["diversity"])


def test_runs_are_cached_and_rerun_only_when_their_config_changes(tmp_path, speech_clips, monkeypatch):
    pool, heldout = speech_clips
    exp = Experiment(
        tmp_path, _grid(), pool, heldout[:4], measure=lambda cell, r: {"n": r["queries"]}, progress=False
    )
    records = exp.run_all()
    assert [r["cell"]["strategy"] for r in records] == ["random", "longest", "random"]
    assert all(r["measures"] == {"n": r["result"]["queries"]} for r in records)
    full = records[-1]["result"]
    assert full["queries"] == len(pool) and set(full["fidelity"]) == {"lstm2"}
    # The cells share one ledger: the whole-pool cell paid only for what the 25% cells had not.
    paid = [r["result"]["query"]["paid"] for r in records]
    assert paid[2] < len(pool) and sum(paid) == len(pool)

    def no_extract(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(experiment, "extract", no_extract)
    again = Experiment(tmp_path, _grid(), pool, heldout[:4], measure=lambda cell, r: {}, progress=False)
    assert again.run_all() == records  # read back, not rerun
    changed = Experiment(tmp_path, _grid(steps=3), pool, heldout[:4], progress=False)
    with pytest.raises(AssertionError, match="ran again"):
        changed.run_all()  # another config: the cell is stale and runs again

    rows = exp.summarise(records)
    assert [(r["budget"], r["strategy"]) for r in rows] == [
        ("25%", "longest"),
        ("25%", "random"),
        ("100%", "all"),
    ]
    assert all(len(r["r2"]) == 1 and len(r["measures"]) == 1 for r in rows)
    table = grid_table(rows, {"clips": lambda r: str(r["queries"][0])})
    assert (
        table.splitlines()[0] == "| budget | strategy | stage 1 | seeds | queried s | held-out r2 | clips |"
    )
    assert f"| 100% | all | no | 1 | {rows[-1]['queried_seconds'][0]:.0f} |" in table
    assert plot_grid(rows, tmp_path / "grid.png").stat().st_size > 0


def test_stage1_arm_and_informed_strategies_in_parallel_workers(tmp_path, speech_clips):
    pool, heldout = speech_clips
    grid = Grid(
        targets={"resemblyzer": SPEC},
        budgets=["20%"],
        strategies=["diversity"],
        stage1=[True, False],
        preset="tiny",
        distill=DistillConfig(steps=1, warmup=1, batch_seconds=10),
        pretrain=PretrainConfig(steps=2, warmup=1, batch_seconds=10, k=8, kmeans_frames=2000),
    )
    exp = Experiment(tmp_path, grid, pool, heldout[:3], progress=False)
    records = exp.run_all(workers=2)
    arms = {r["cell"]["stage1"]: r for r in records}
    stage1_dir = str(exp.stage1_dir(0) / "iter1")
    assert arms[True]["config"]["init"] == stage1_dir and arms[False]["config"]["init"] is None
    # ... and the stage-1 arm's student really started from it (extract's default start is scratch).
    started = {arm: Student.load(r["result"]["student"]["path"])[1]["init"] for arm, r in arms.items()}
    assert started == {True: stage1_dir, False: None}
    # Both arms ranked by the same stage-1 scores, so they queried the same clips.
    assert arms[True]["config"]["scores"] == arms[False]["config"]["scores"]
    assert arms[True]["result"]["queries"] == arms[False]["result"]["queries"]
    # Everything was paid before the workers started: they only read the ledgers.
    assert all(r["result"]["query"]["paid"] == 0 for r in records)
