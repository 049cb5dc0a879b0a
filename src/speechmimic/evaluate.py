"""Target, student and a plain-feature baseline probed side by side on the same tasks and splits.

What was stolen is read off the **recovered share** = (student - baseline) / (target - baseline):
plain MFCC already solves some tasks, so only the share of the target's advantage over it says how
much of the target the thief got. ``ratio`` is student / target on a higher-is-better scale
(accuracy, or 1 - error rate for PER/WER).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from speechmimic.probe import probe
from speechmimic.tasks import Task

UPSTREAMS = ("target", "student", "baseline")


def _higher_is_better(metric: str, value: float) -> float:
    return value if metric == "accuracy" else 1.0 - value


def compare(scores: dict[str, float], metric: str) -> dict[str, float | None]:
    """ratio and recovered share from the three test scores of one task."""
    t, s, b = (_higher_is_better(metric, scores[k]) for k in UPSTREAMS)
    return {
        "ratio": round(s / t, 4) if t else None,
        "recovered": round((s - b) / (t - b), 4) if abs(t - b) > 1e-9 else None,
    }


def evaluate(
    target: str,
    student: str | Path,
    tasks: list[Task],
    out_dir: str | Path,
    baseline: str = "mfcc",
    seed: int = 0,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **probe_options,
) -> dict:
    """Probe the three upstreams on every task; returns ``{task: {target, student, baseline, ratio,
    recovered, metric, layer_weights}}`` and writes ``probes.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "feature_cache"
    upstreams = {"target": target, "student": str(student), "baseline": baseline}
    results = {}
    for task in tasks:
        runs = {
            role: probe(
                spec,
                task,
                out_dir=out_dir / task.name / role,
                seed=seed,
                device=device,
                cache_dir=cache_dir,
                progress=progress,
                **probe_options,
            )
            for role, spec in upstreams.items()
        }
        metric = runs["target"]["metric"]
        scores = {role: float(r["test"]) for role, r in runs.items()}
        results[task.name] = {
            "metric": metric,
            **scores,
            **compare(scores, metric),
            "chance": runs["target"].get("baselines"),
            "layer_weights": {role: r["layer_weights"] for role, r in runs.items()},
        }
    (out_dir / "probes.json").write_text(json.dumps(results, indent=2))
    return results


def probe_table(results: dict) -> str:
    lines = [
        "| task | metric | target | student | baseline | student/target | recovered share |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rec = "n/a" if r["recovered"] is None else f"{r['recovered']:.0%}"
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {name} | {r['metric']} | {r['target']:.3f} | {r['student']:.3f} | "
            f"{r['baseline']:.3f} | {ratio} | {rec} |"
        )
    return "\n".join(lines)


def plot_probes(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """``probes.png``: grouped bars of the three test scores per task; ``layer_weights.png``: the
    learned weight of every hidden state, per task and upstream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    names = list(results)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(names), 3.6))
    x = np.arange(len(names))
    for i, role in enumerate(("baseline", "student", "target")):
        ax.bar(x + (i - 1) * 0.27, [results[n][role] for n in names], 0.27, label=role)
    ax.set_xticks(x, [f"{n}\n({results[n]['metric']})" for n in names], fontsize=8)
    ax.set_title("test score per task (accuracy: higher is better; PER/WER: lower)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    scores = out_dir / "probes.png"
    fig.savefig(scores, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(names), 2, figsize=(9, 2.4 * len(names)), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        for ax, role in zip(row, ("student", "target"), strict=True):
            weights = results[name]["layer_weights"][role]
            ax.bar(range(len(weights)), list(weights.values()))
            ax.set_xticks(range(len(weights)), list(weights), rotation=30, fontsize=7, ha="right")
            ax.set_title(f"{name}: {role} layer weights", fontsize=9)
    fig.tight_layout()
    weights_path = out_dir / "layer_weights.png"
    fig.savefig(weights_path, dpi=110)
    plt.close(fig)
    return {"scores": scores, "layer_weights": weights_path}


def merge_into_report(results: dict, report_dir: str | Path, plots: dict[str, Path] | None = None) -> None:
    """Add the results to an extraction report: ``probes`` in report.json, a section in report.md."""
    report_dir = Path(report_dir)
    path = report_dir / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["probes"] = {
        name: {k: r[k] for k in ("metric", *UPSTREAMS, "ratio", "recovered")} for name, r in results.items()
    }
    path.write_text(json.dumps(report, indent=2))
    md_path = report_dir / "report.md"
    md = md_path.read_text() if md_path.exists() else ""
    md = md.split(PROBES_HEADING)[0].rstrip() + "\n\n" + probes_section(results, plots, report_dir)
    md_path.write_text(md)


PROBES_HEADING = "## Downstream probes"


def probes_section(results: dict, plots: dict[str, Path] | None, report_dir: Path) -> str:
    lines = [
        PROBES_HEADING,
        "",
        "Frozen upstream, learnable softmax-weighted sum of its layers, light head (SUPERB-style); dev",
        "split for early stopping, test scored once. **recovered share** = (student - baseline) /",
        "(target - baseline): only the share of the target's advantage over plain features says what",
        "was stolen.",
        "",
        probe_table(results),
        "",
    ]
    for key, title in (("scores", "probe scores"), ("layer_weights", "layer weights")):
        if plots and key in plots:
            lines.append(f"![{title}]({os.path.relpath(plots[key], report_dir)})")
    return "\n".join(lines) + "\n"
