"""A grid of extractions, each cached and resumable under one folder, and its summary over seeds.

A :class:`Grid` names the targets, budgets, strategies, stage-1 arms (stage 2 from the stage-1
student, or from scratch) and seeds, and the training settings every cell shares; a :class:`Cell`
is one point of it. :class:`Experiment` runs cells with :func:`~speechmimic.extract.extract` and
keeps everything under ``root``::

    stage1/seed<N>/iter<K>/    stage 1, pretrained on the pool once per seed (when the grid has one)
    stage1/seed<N>/scores-<hash>.npz  its scores of the pool: informed strategies rank by them in both arms
    ledgers/<target>/pool      the thief's paid answers, shared by the runs of a target
    ledgers/<target>/heldout   the evaluator's answers to the held-out clips
    runs/<target>/<budget>/<strategy>-<arm>-s<seed>/   one extraction, and cell.json: its record

A cell whose ``cell.json`` holds the same cell, the same :class:`~speechmimic.extract.ExtractConfig`
and the same ``measure_id`` is done: a rerun reads it back; anything else runs again (stage 1,
scores, answers and interrupted training are cached below it, so little is redone). ``measure``, if
given, is called on every finished cell (``measure(cell, result) -> dict``, e.g. probes of the
student) and its output is stored in the record.

Cells run one after another, or in ``workers`` processes of one thread each; then stage 1 and all
the answers are paid for first, in this process, so that the workers only read the ledgers.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from speechmimic import config, records
from speechmimic.budget import Budget
from speechmimic.corpus import Clip
from speechmimic.defences import load_target
from speechmimic.distill import DistillConfig
from speechmimic.errors import InputError
from speechmimic.extract import ExtractConfig, extract
from speechmimic.fidelity import mean_r2
from speechmimic.ledger import Ledger, query_clips
from speechmimic.pretrain import PretrainConfig, pretrain
from speechmimic.score import scores_path
from speechmimic.select import STRATEGIES
from speechmimic.targets import Target

CELL_NAME = "cell.json"


@dataclass(frozen=True)
class Cell:
    """One extraction of the grid."""

    target: str  # a name of Grid.targets
    budget: str  # as Budget.parse reads it: "10%", "600s", "200"
    strategy: str
    stage1: bool  # stage 2 starts from the seed's stage-1 student (else from random weights)
    seed: int

    @property
    def name(self) -> str:
        arm = "stage1" if self.stage1 else "scratch"
        return f"{self.target}/{self.budget.replace('%', 'pct')}/{self.strategy}-{arm}-s{self.seed}"


@dataclass
class Grid:
    """What to run: every combination of targets x budgets x seeds x stage-1 arms x strategies.

    A budget that covers the whole pool is run once per (target, arm, seed), as ``random``: every
    strategy picks the whole pool there. ``pretrain`` is stage 1 (its seed set per seed); it is
    needed by the stage-1 arm and by informed strategies, whose scores come from it.
    """

    targets: dict[str, str]  # name -> target spec
    budgets: list[str]
    strategies: list[str] = field(default_factory=lambda: ["random"])
    stage1: list[bool] = field(default_factory=lambda: [False])
    seeds: list[int] = field(default_factory=lambda: [0])
    preset: str = "small"
    distill: DistillConfig = field(default_factory=DistillConfig)
    pretrain: PretrainConfig | None = None

    def __post_init__(self):
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise InputError(f"unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
        if self.pretrain is None:
            if True in self.stage1:
                raise InputError("the stage-1 arm needs a stage-1 config (pretrain=PretrainConfig(...))")
            informed = [s for s in self.strategies if STRATEGIES[s].needs]
            if informed:
                raise InputError(
                    f"strategies {informed} rank by stage-1 scores: give the grid a stage-1 config"
                )

    def cells(self, pool: list[Clip]) -> list[Cell]:
        out = []
        for target in self.targets:
            for budget in self.budgets:
                strategies = ["random"] if covers(budget, pool) else self.strategies
                for seed in self.seeds:
                    for arm in self.stage1:
                        out += [Cell(target, budget, s, arm, seed) for s in strategies]
        return out


def covers(budget: str, pool: list[Clip]) -> bool:
    """Whether ``budget`` admits the whole pool."""
    return Budget.parse(budget, pool_seconds=sum(c.duration for c in pool)).allows(
        len(pool), sum(c.duration for c in pool)
    )


# Targets built once per process (loading a model costs seconds; a process runs many cells).
_TARGETS: dict[str, Target] = {}


def _target(spec: str) -> Target:
    if spec not in _TARGETS:
        _TARGETS[spec] = load_target(spec)
    return _TARGETS[spec]


def _one_thread() -> None:
    torch.set_num_threads(1)  # two one-thread runs side by side beat one two-thread run on 2 cores


class Experiment:
    """Runs the cells of ``grid`` on ``pool`` (fidelity on ``heldout``) under ``root``."""

    def __init__(
        self,
        root: str | Path,
        grid: Grid,
        pool: list[Clip],
        heldout: list[Clip],
        measure: Callable[[Cell, dict], dict] | None = None,
        measure_id: Any = None,
        progress: bool = True,
    ):
        self.root = Path(root)
        self.grid = grid
        self.pool = pool
        self.heldout = heldout
        self.measure = measure
        self.measure_id = measure_id
        self.progress = progress

    # -- where things live ------------------------------------------------------------------------------
    def stage1_dir(self, seed: int) -> Path:
        return self.root / "stage1" / f"seed{seed}"

    def ledger_dir(self, target: str, part: str) -> Path:
        """``part``: ``pool`` (the thief's answers) or ``heldout`` (the evaluator's)."""
        return self.root / "ledgers" / target / part

    def run_dir(self, cell: Cell) -> Path:
        return self.root / "runs" / cell.name

    # -- stage 1, once per seed -------------------------------------------------------------------------
    def stage1(self, seed: int) -> tuple[Path, Path | None]:
        """The seed's stage-1 checkpoint and the file of its scores of the pool, or None when no
        strategy of the grid ranks by scores (made once; the file is named by a hash of the pool and
        the weights, so a retrained stage 1 is scored anew and the cells that ranked by the old
        scores run again)."""
        cfg = replace(self.grid.pretrain, seed=seed)
        out = self.stage1_dir(seed)
        last = out / f"iter{cfg.iterations}"
        pretrain(self.pool, out, cfg, preset=self.grid.preset, progress=self.progress)
        if not any(STRATEGIES[s].needs for s in self.grid.strategies):
            return last, None
        return last, scores_path(last, self.pool, out, seed, self.progress)

    def config(self, cell: Cell) -> ExtractConfig:
        init = scores = None
        if self.grid.pretrain is not None:
            last, path = self.stage1(cell.seed)
            init, scores = (str(last) if cell.stage1 else None), (str(path) if path else None)
        return ExtractConfig(
            budget=cell.budget,
            strategy=cell.strategy,
            seed=cell.seed,
            preset=self.grid.preset,
            init=init,
            scores=scores,
            start="stage1" if init else "scratch",
            distill=replace(self.grid.distill, seed=cell.seed),
        )

    # -- cells ------------------------------------------------------------------------------------------
    def made_by(self, cell: Cell, cfg: ExtractConfig) -> dict:
        """What a cell's record is keyed by: the cell, its config and the measure."""
        return {"cell": asdict(cell), "config": config.to_dict(cfg), "measure_id": self.measure_id}

    def done(self, cell: Cell, cfg: ExtractConfig) -> dict | None:
        """The stored record of ``cell`` if it was made by this config and measure, else None."""
        return records.read(self.run_dir(cell) / CELL_NAME, self.made_by(cell, cfg))

    def run(self, cell: Cell) -> dict:
        """One cell's record (``cell``, ``config``, ``result`` of extract, ``measures``), cached."""
        cfg = self.config(cell)
        record = self.done(cell, cfg)
        if record is not None:
            return record
        t0 = time.time()
        result = extract(
            _target(self.grid.targets[cell.target]),
            self.pool,
            self.run_dir(cell),
            cfg,
            heldout=self.heldout,
            ledger_dir=self.ledger_dir(cell.target, "pool"),
            eval_ledger_dir=self.ledger_dir(cell.target, "heldout"),
            progress=self.progress,
        )
        return records.write(
            self.run_dir(cell) / CELL_NAME,
            self.made_by(cell, cfg),
            {
                "result": result,
                "measures": self.measure(cell, result) if self.measure else {},
                "seconds": round(time.time() - t0, 1),
            },
        )

    def prepare(self) -> None:
        """Stage 1 for every seed and the answers to the whole pool and held-out set, paid here."""
        if self.grid.pretrain is not None:
            for seed in self.grid.seeds:
                self.stage1(seed)
        for name, spec in self.grid.targets.items():
            target = _target(spec)
            query_clips(target, self.pool, Ledger(self.ledger_dir(name, "pool")), progress=self.progress)
            query_clips(
                target, self.heldout, Ledger(self.ledger_dir(name, "heldout")), progress=self.progress
            )

    def run_all(self, workers: int = 1) -> list[dict]:
        """Every cell's record, in grid order; with ``workers`` > 1, in parallel processes."""
        cells = self.grid.cells(self.pool)
        if workers <= 1:
            return [
                self.run(cell)
                for cell in tqdm(cells, desc="extractions", unit="run", disable=not self.progress)
            ]
        self.prepare()
        records: dict[Cell, dict] = {}
        quiet = Experiment(
            self.root, self.grid, self.pool, self.heldout, self.measure, self.measure_id, False
        )
        with ProcessPoolExecutor(workers, initializer=_one_thread) as ex:
            futures = {ex.submit(quiet.run, cell): cell for cell in cells}
            bar = tqdm(total=len(cells), desc="extractions", unit="run", disable=not self.progress)
            for fut in as_completed(futures):
                record = fut.result()
                records[futures[fut]] = record
                bar.update(1)
                bar.set_postfix_str(
                    f"{futures[fut].name} r2 {mean_r2(record['result']['fidelity']):.3f}", refresh=False
                )
            bar.close()
        return [records[c] for c in cells]

    # -- summary ----------------------------------------------------------------------------------------
    def summarise(self, records: list[dict]) -> list[dict]:
        """One row per (target, budget, strategy, arm): lists over seeds of queried seconds, queries,
        held-out r2 (mean over returned layers) and every measure; rows in grid order, arms
        from scratch first, strategies by name. A whole-pool budget's strategy reads ``all``."""
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in records:
            c = r["cell"]
            groups[(c["target"], c["budget"], c["strategy"], c["stage1"])].append(r)
        targets, budgets = list(self.grid.targets), list(self.grid.budgets)
        rows = []
        for (target, budget, strategy, s1), runs in sorted(
            groups.items(),
            key=lambda kv: (targets.index(kv[0][0]), budgets.index(kv[0][1]), kv[0][3], kv[0][2]),
        ):
            row = {
                "target": target,
                "budget": budget,
                "budget_seconds": runs[0]["result"]["budget_seconds"],
                "strategy": "all" if covers(budget, self.pool) else strategy,
                "stage1": s1,
                "seeds": sorted(r["cell"]["seed"] for r in runs),
                "queried_seconds": [r["result"]["queried_seconds"] for r in runs],
                "queries": [r["result"]["queries"] for r in runs],
                "r2": [round(mean_r2(r["result"]["fidelity"]), 4) for r in runs],
                "measures": [r["measures"] for r in runs],
            }
            rows.append(row)
        return rows
