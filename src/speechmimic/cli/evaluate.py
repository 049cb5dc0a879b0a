"""``speechmimic evaluate``: target, student and baseline probed side by side on downstream tasks."""

from __future__ import annotations

import json
from pathlib import Path

from speechmimic import config
from speechmimic.cli import _options
from speechmimic.probe import ProbeConfig
from speechmimic.report import evaluate_and_report, probe_table
from speechmimic.tasks import load_task


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="probe target, student and an MFCC baseline on the same tasks; table of the recovered share",
        description="Probe the target, the extracted student and a learning-free baseline on the same "
        "tasks and splits (SUPERB-style: frozen upstream, learnable layer weights, light head). Prints "
        "target, student and baseline test scores, student/target and the recovered share = "
        "(student - baseline) / (target - baseline), plots them, and merges them into a report.json "
        "(under 'probes') and report.md when --report is given.",
    )
    _options.add_target(p)
    p.add_argument("--student", required=True, help="extracted student folder")
    p.add_argument(
        "--tasks",
        required=True,
        nargs="+",
        metavar="TASK_DIR",
        help="task folders (task.json + train/dev/test manifests, e.g. from 'speechmimic recipe')",
    )
    p.add_argument(
        "--baseline",
        default="mfcc",
        choices=("mfcc", "fbank", "mfcc+cmvn", "fbank+cmvn"),
        help="learning-free upstream the advantage is measured over (default: mfcc)",
    )
    p.add_argument(
        "--out", required=True, help="folder for probes.json, plots, probe results and feature cache"
    )
    p.add_argument(
        "--report",
        default=None,
        help="folder of an extraction report (report.json, report.md) to merge the results into",
    )
    p.add_argument("--cache", default=None, help="feature cache folder (default: OUT/feature_cache)")
    p.add_argument(
        "--eval-ledger",
        default=None,
        metavar="DIR",
        help="ledger of the target's answers to the task clips (default: OUT/eval_ledger); give an "
        "extraction's eval_ledger to reuse what its fidelity check already paid for",
    )
    _options.add_config_flags(p.add_argument_group("probe training"), ProbeConfig, skip=("layers",))
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    tasks = [load_task(t) for t in args.tasks]
    results, plots = evaluate_and_report(
        args.target,
        args.student,
        tasks,
        args.out,
        report_dir=args.report,
        baseline=args.baseline,
        cfg=config.from_dict(ProbeConfig, _options.given(args, ProbeConfig)),
        cache_dir=args.cache,
        progress=not args.no_progress,
        ledger=args.eval_ledger,
    )
    print(probe_table(results))
    print(f"\nplots: {plots['scores']}, {plots['layer_weights']}")
    if args.report:
        print(f"merged into {Path(args.report) / 'report.json'} and report.md")
    else:
        print(json.dumps({"probes": str(Path(args.out) / "probes.json")}))
    return 0
