"""``speechmimic extract``: (stage 1) -> select -> query -> distill in one go."""

from __future__ import annotations

import json
from pathlib import Path

from speechmimic import config
from speechmimic.budget import check as check_budget
from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.defences import load_target
from speechmimic.distill import DistillConfig
from speechmimic.errors import InputError
from speechmimic.extract import ExtractConfig, extract
from speechmimic.pretrain import PretrainConfig
from speechmimic.sybil import Sybils

# Loop settings that --seed / --device / --checkpoint-every set for stage 1 and stage 2 alike.
_SHARED = ("seed", "device", "checkpoint_every")


def register(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="run a budgeted extraction: (stage 1), select, query and distill",
        description="Run a query-budgeted extraction in one go: select clips within the budget (an "
        "informed strategy first pretrains a student on the manifest, stage 1, no queries, in OUT/stage1, "
        "to score the pool), query the target through a ledger that refuses to pay beyond it, and train "
        "a student on the answers, from random weights (--start stage1: from the stage-1 student); with "
        "--heldout, also measure fidelity on clips never queried. --stage1 DIR uses an existing stage-1 "
        "checkpoint instead, --from-scratch never runs stage 1. OUT/result.json records every setting "
        "(rerun them with --config OUT/result.json). Rerun to resume.",
    )
    _options.add_target(p)
    p.add_argument("--manifest", required=True, help="the thief's candidate clips (JSONL manifest)")
    p.add_argument(
        "--heldout",
        default=None,
        help="manifest of held-out clips for fidelity (their answers go to a separate evaluation ledger)",
    )
    p.add_argument(
        "--out", required=True, help="output folder (selected.jsonl, ledger/, student/, result.json)"
    )
    g = p.add_argument_group("the extraction")
    _options.add_config_flags(g, ExtractConfig)
    _options.add_from_scratch(g)
    d = p.add_argument_group("distillation (stage 2 training; --seed, --device and --checkpoint-every also "
                             "apply to stage 1)")  # fmt: skip
    _options.add_config_flags(d, DistillConfig, skip=("seed",))
    s = p.add_argument_group("stage 1 (when needed and neither --stage1 nor --from-scratch is given)")
    _options.add_config_flags(s, PretrainConfig, prefix="stage1-", skip=_SHARED)
    a = p.add_argument_group("several API keys (against per-key defences)")
    a.add_argument(
        "--sybil",
        action="append",
        default=[],
        metavar="SPEC",
        help="another API key of the same target, as a target spec (repeat for more): clips are spread "
        "over --target's key and these, and each key's answers are mapped into the first key's "
        "coordinates by a linear map fitted on --anchors clips asked through every key",
    )
    a.add_argument(
        "--anchors", type=int, default=8, help="clips asked through every key to fit the maps (default 8)"
    )
    _options.add_config_file(p, "extraction")
    _options.add_store(p)
    _options.add_progress(p)
    p.set_defaults(func=run)


def resolve(args) -> ExtractConfig:
    """The extraction's settings: defaults < --config file < flags."""
    file = _options.file_settings(args)
    if file and "start" not in file and (file.get("init") or file.get("stage1")):
        file["start"] = "stage1"  # written before `start` existed, when stage 2 began from stage 1
    values = {**file, **_options.given(args, ExtractConfig)}
    shared = {k: v for k, v in _options.given(args, DistillConfig).items() if k in _SHARED}
    if "seed" in values and hasattr(args, "seed"):
        shared["seed"] = values["seed"]
    values["distill"] = {**(file.get("distill") or {}), **_options.given(args, DistillConfig, skip=("seed",))}
    values["distill"].update(shared)
    stage1_flags = _options.given(args, PretrainConfig, prefix="stage1-", skip=_SHARED)
    if args.from_scratch:
        values["init"] = values["stage1"] = None
    elif values.get("init") is not None:
        values["stage1"] = None
    elif "stage1" in file and file["stage1"] is None and not stage1_flags:
        values["stage1"] = None  # the file says: from scratch
    else:  # the command line's default: stage 1 on the manifest
        values["stage1"] = {**(file.get("stage1") or {}), **stage1_flags, **shared}
    if "budget" not in values:
        raise InputError("give --budget (or a --config file that sets one)")
    check_budget(values["budget"])  # before anything is written or trained
    return config.from_dict(ExtractConfig, values)


def run(args) -> int:
    cfg = resolve(args)
    if args.print_config:
        return _options.print_config(cfg)
    target = load_target(args.target, device=cfg.distill.device)
    if args.sybil:
        keys = [target, *(load_target(spec, device=cfg.distill.device) for spec in args.sybil)]
        target = Sybils(keys, args.anchors, store=Path(args.out) / "sybil_anchors.npz")
    result = extract(
        target,
        read_manifest(args.manifest),
        args.out,
        cfg,
        heldout=read_manifest(args.heldout) if args.heldout else None,
        progress=not args.no_progress,
        store=args.store,
    )
    print(json.dumps(result, indent=2))
    return 0
