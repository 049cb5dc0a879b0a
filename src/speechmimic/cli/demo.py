"""``speechmimic demo``: a whole extraction of a real pretrained encoder, on the shipped corpus."""

from __future__ import annotations

from speechmimic import config
from speechmimic.cli import _options
from speechmimic.demo import DemoConfig


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="extract a real pretrained transformer (Whisper tiny.en's encoder) on the shipped corpus "
        "(about 5 min on 2 CPU cores)",
        description="Run a complete, query-budgeted extraction of a real pretrained encoder "
        "(Whisper tiny.en's encoder, all five states returned; --target resemblyzer?layers=all for the GE2E "
        "speaker LSTM) using the synthetic "
        "corpus shipped in the package: stage 2 at each budget, held-out fidelity, "
        "report.json, report.md and a plot in --out. Rerun to resume.",
    )
    p.add_argument("--out", required=True, help="output folder")
    _options.add_config_flags(p.add_argument_group("demo settings"), DemoConfig)
    _options.add_config_file(p, "demo")
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from speechmimic.demo import run_demo

    cfg = config.from_dict(DemoConfig, {**_options.file_settings(args), **_options.given(args, DemoConfig)})
    if args.print_config:
        return _options.print_config(cfg)
    run_demo(args.out, cfg, progress=not args.no_progress)
    return 0
