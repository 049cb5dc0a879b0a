"""``speechmimic demo``: a real extraction on a laptop CPU with nothing beyond ``pip install``.

Target: Whisper tiny.en's pretrained encoder returning all five states (a real transformer, 4 layers x
384 at 50 Hz; ``target="resemblyzer?layers=all"`` attacks the GE2E speaker LSTM instead). Thief's pool
and held-out clips: the synthetic corpus shipped in ``speechmimic/data/demo_corpus`` (its
``split`` label). Stage 2 runs at each budget with the same training compute (a grid of
:mod:`speechmimic.experiment`, so an interrupted demo resumes), then the report compares held-out
fidelity across budgets, and probes target, student and MFCC on keyword, speaker-ID and
speaker-verification tasks built from held-out clips only (never queried; the target's answers to
them come from the evaluation ledger the fidelity check filled).

With ``http=True`` the same attack goes over the wire: the target is served by ``speechmimic serve``
on a loopback port (``OUT/server``: its key database and logs), the attack pays through an
``http://`` target, and the report sets the server's accounting beside the ledgers'.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from speechmimic import config
from speechmimic.config import option
from speechmimic.distill import DistillConfig
from speechmimic.experiment import Experiment, Grid
from speechmimic.fidelity import mean_r2
from speechmimic.ledger import Ledger
from speechmimic.probe import ProbeConfig
from speechmimic.recipes.demo import demo_corpus, demo_tasks
from speechmimic.report import (
    evaluate_and_report,
    fidelity_table,
    merge_into_report,
    probe_table,
    usage_table,
    write_report,
)
from speechmimic.serve.process import ServerProcess
from speechmimic.student import PRESET_HELP, PRESETS

DEMO_TARGET = "whisper:tiny.en?layers=all"
DEMO_KEY_ENV = "SPEECHMIMIC_DEMO_KEY"


def start_demo_server(root: Path, target_spec: str) -> tuple[ServerProcess, str]:
    """``target_spec`` served on loopback, and the spec of an ``http://`` target paying through it.

    The port and the key are kept in ``root``, so a rerun of the demo resumes with the same target
    spec (the ledgers refuse another) and the same account."""
    port_file, key_file = root / "port", root / "demo.key"
    port = int(port_file.read_text()) if port_file.exists() else None
    server = ServerProcess(root, target_spec, port=port).start()
    port_file.write_text(str(server.port))
    if not key_file.exists():
        token = server.key("demo")
        key_file.write_text(token)
        key_file.chmod(0o600)
    os.environ[DEMO_KEY_ENV] = key_file.read_text().strip()
    return server, f"{server.url}?key_env={DEMO_KEY_ENV}"


def server_usage(server: ServerProcess, ledgers: dict[str, Ledger]) -> list[dict]:
    """The server's charges for the demo's key beside what each ledger paid, in requests and samples."""
    rows = [{"who": f"ledger {name}", "requests": led.spent_clips, "samples": led.spent_samples}
            for name, led in ledgers.items()]  # fmt: skip
    rows.append({"who": "ledgers, total", "requests": sum(r["requests"] for r in rows),
                 "samples": sum(r["samples"] for r in rows)})  # fmt: skip
    used = server.usage("demo")
    rows.append({"who": "server, key 'demo'", "requests": used.requests, "samples": used.samples})
    return rows


@dataclass
class DemoConfig:
    """What the demo runs (``report.json`` records it under ``config``)."""

    target: str = option(
        DEMO_TARGET,
        "target spec ('resemblyzer?layers=all': the speaker LSTM the demo attacked before)",
        metavar="SPEC",
    )
    budgets: list[str] = option(
        help="budgets, comma-separated: N% of the pool's seconds, N clips or Ns/Nm",
        metavar="B,B",
        factory=lambda: ["10%", "100%"],
    )
    steps: int = option(350, "training steps per budget, equal for all")
    seed: int = option(0, "seed of every random choice")
    preset: str = option("small", PRESET_HELP, choices=tuple(PRESETS))
    probes: bool = option(
        True, "probe target, student and MFCC on keywords, speaker ID and verification of held-out clips"
    )
    http: bool = option(
        False,
        "attack over the wire: serve the target with 'speechmimic serve' on a free loopback port "
        "(OUT/server) and pay through an http:// target; the report adds the server's charges beside "
        "the ledgers' payments",
    )


def run_demo(out_dir: str | Path, cfg: DemoConfig | None = None, progress: bool = True) -> dict:
    cfg = cfg or DemoConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    server, target_spec = None, cfg.target
    if cfg.http:
        server, target_spec = start_demo_server(out_dir / "server", target_spec)
        print(f"serving the target on {server.url}; the attack pays through it", flush=True)
    try:
        return _run_demo(out_dir, cfg, target_spec, progress, server)
    finally:
        if server is not None:
            server.stop()


def _run_demo(out_dir: Path, cfg: DemoConfig, target_spec: str, progress: bool, server) -> dict:
    t_start = time.time()
    pool, heldout = demo_corpus()
    pool_seconds = sum(c.duration for c in pool)
    name = target_spec.partition("?")[0].partition(":")[0]  # "whisper", "resemblyzer", "hf"
    seed = cfg.seed
    grid = Grid(
        targets={name: target_spec},
        budgets=list(cfg.budgets),
        seeds=[seed],
        preset=cfg.preset,
        distill=DistillConfig(steps=cfg.steps, seed=seed),
    )
    experiment = Experiment(out_dir, grid, pool, heldout, progress=progress)
    runs = []
    for cell in grid.cells(pool):
        result = {**experiment.run(cell)["result"], "label": cell.budget}
        runs.append(result)
        print(
            f"budget {cell.budget}: {result['queries']} clips, {result['queried_seconds']:.0f} s queried, "
            f"held-out r2 {mean_r2(result['fidelity']):.3f}",
            flush=True,
        )
    best = max(runs, key=lambda r: r["queried_seconds"])
    keep = ("label", "budget_seconds", "queries", "queried_seconds", "fidelity", "student", "timings")
    report = {
        "target": best["target"],
        "student": best["student"],
        "pool": {"clips": len(pool), "seconds": round(pool_seconds, 1)},
        "heldout_clips": len(heldout),
        "steps_per_run": cfg.steps,
        "seed": seed,
        "config": config.to_dict(cfg),
        "runs": [{k: r[k] for k in keep} for r in runs],
        "timings": {
            "total": round(time.time() - t_start, 1),
            **{f"run {r['label']}": sum(r["timings"].values()) for r in runs},
        },
    }
    paths = write_report(report, out_dir)
    print()
    print(fidelity_table(report["runs"]))

    if cfg.probes:
        t = time.time()
        tasks = demo_tasks(heldout, out_dir / "tasks", seed=seed)
        # The probe clips are held-out clips, whose answers the fidelity check already paid for.
        results, plots = evaluate_and_report(
            best["target"],
            best["student"]["path"],
            tasks,
            out_dir / "probes",
            cfg=ProbeConfig(seed=seed),
            progress=progress,
            ledger=experiment.ledger_dir(name, "heldout"),
        )
        report["timings"]["probes"] = round(time.time() - t, 1)
        report["timings"]["total"] = round(time.time() - t_start, 1)
        paths = write_report(report, out_dir)
        merge_into_report(results, out_dir, plots)
        report["probes"] = json.loads(paths["json"].read_text())["probes"]
        print()
        print(probe_table(results))
    if server is not None:
        ledgers = {part: Ledger(experiment.ledger_dir(name, part)) for part in ("pool", "heldout")}
        report["usage"] = server_usage(server, ledgers)
        paths = write_report(report, out_dir)
        if cfg.probes:
            merge_into_report(results, out_dir, plots)
        print()
        print(usage_table(report["usage"]))
    print(f"\nwrote {paths['json']}, {paths['md']} and {paths['plot']}")
    return report
