"""``speechmimic probe``: score a frozen upstream on a downstream task with a light SUPERB-style head."""

from __future__ import annotations

import json

from speechmimic import config
from speechmimic.cli import _options
from speechmimic.probe import ProbeConfig, probe


def register(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="score a frozen upstream on a task (keyword/speaker/... accuracy, PER, WER)",
        description="Train a softmax-weighted sum of the upstream's layers and a light head on a task "
        "folder's train split, pick the epoch by the dev split, and score the test split once. "
        "A verify (speaker verification) task trains nothing: each layer's clip means are scored by "
        "cosine on the dev trials (standardised by the train split), the best layer once on the test "
        "trials, as an equal error rate. "
        "Upstream features are computed once per clip and cached when --cache is given.",
    )
    p.add_argument(
        "--upstream",
        required=True,
        metavar="SPEC_OR_DIR",
        help="an extracted student's folder, a target spec ('resemblyzer?layers=all', 'hf:...'), "
        "or a learning-free baseline: 'mfcc' or 'fbank'",
    )
    p.add_argument("--task", required=True, metavar="TASK_DIR", help="task folder (task.json + splits)")
    _options.add_target_ledger(p, "--upstream")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for result.json and the probe weights")
    _options.add_config_flags(p.add_argument_group("probe training"), ProbeConfig, skip=("layers",))
    p.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="folder caching upstream features across runs (default: none)",
    )
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    result = probe(
        args.upstream,
        args.task,
        out_dir=args.out,
        cfg=config.from_dict(ProbeConfig, _options.given(args, ProbeConfig)),
        cache_dir=args.cache,
        progress=not args.no_progress,
        ledger=args.ledger,
    )
    base = ", ".join(f"{k} {v:.3f}" for k, v in result["baselines"].items())
    if "best_epoch" in result:
        chosen = f"epoch {result['best_epoch']}/{result['epochs']}"
    else:  # a verification probe trains nothing: it chooses a state
        chosen = f"state {next(iter(result['layer_weights']))}, cosine scoring"
    print(
        f"{result['task']} {result['metric']}: test {result['test']:.4f} (dev {result['dev']:.4f}, "
        f"{chosen}; baselines: {base}) upstream {result['upstream']}"
    )
    if args.out:
        print(f"-> {args.out}/result.json")
    else:
        print(json.dumps(result["layer_weights"]))
    return 0
