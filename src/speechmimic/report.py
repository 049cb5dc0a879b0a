"""Reports: fidelity of extraction runs (a printed table, ``report.md``, a plot of fidelity against
queried seconds) and downstream probes (a table, plots, a section merged into a report)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from speechmimic.audio import SAMPLE_RATE
from speechmimic.evaluate import UPSTREAMS, evaluate
from speechmimic.fidelity import mean_r2


def fidelity_table(runs: list[dict]) -> str:
    """A markdown table: one row per (run, returned layer)."""
    lines = [
        "| budget | queries | queried s | layer | r2 | cosine | constant cosine | L1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for layer, f in run["fidelity"].items():
            lines.append(
                f"| {run['label']} | {run['queries']} | {run['queried_seconds']:.0f} | {layer} | "
                f"{f['r2']:.3f} | {f['cosine']:.3f} | {f['constant_cosine']:.3f} | {f['l1']:.4f} |"
            )
        lines.append(f"| {run['label']} | | | **mean** | **{mean_r2(run['fidelity']):.3f}** | | | |")
    return "\n".join(lines)


def plot_fidelity(runs: list[dict], path: str | Path, title: str = "") -> Path:
    """r2 and cosine of every returned layer against queried seconds (constant-mean cosine dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(runs, key=lambda r: r["queried_seconds"])
    xs = [r["queried_seconds"] for r in runs]
    layers = list(runs[0]["fidelity"])
    fig, (ax_r2, ax_cos) = plt.subplots(1, 2, figsize=(10, 4))
    for layer in layers:
        ax_r2.plot(xs, [r["fidelity"][layer]["r2"] for r in runs], marker="o", label=layer)
        line = ax_cos.plot(xs, [r["fidelity"][layer]["cosine"] for r in runs], marker="o", label=layer)[0]
        ax_cos.plot(
            xs,
            [r["fidelity"][layer]["constant_cosine"] for r in runs],
            ls="--",
            color=line.get_color(),
            alpha=0.6,
            label=f"{layer}: constant mean frame",
        )
    ax_r2.plot(xs, [mean_r2(r["fidelity"]) for r in runs], marker="s", color="black", lw=2, label="mean")
    ax_r2.set(
        xlabel="queried audio (s)", ylabel="held-out explained variance r2", title="r2 (higher is better)"
    )
    ax_cos.set(
        xlabel="queried audio (s)", ylabel="held-out frame cosine", title="cosine vs constant baseline"
    )
    for ax in (ax_r2, ax_cos):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str | Path, plot_name: str = "fidelity.png") -> dict[str, Path]:
    """Writes ``report.json``, ``report.md`` and the plot into ``out_dir``."""
    out_dir = Path(out_dir)
    plot = plot_fidelity(report["runs"], out_dir / plot_name, title=f"extraction of {report['target']}")
    report = {**report, "plot": plot.name}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    md = [
        "# speechmimic extraction report\n",
        f"- target: `{report['target']}`",
        f"- student: {report['student']['params'] / 1e6:.2f} M parameters, `{report['student']['path']}`",
        f"- held-out clips (never queried): {report.get('heldout_clips', '?')}",
        "",
        "Fidelity on held-out clips. `r2` is the explained variance against the mean target frame of the",
        "queried clips; `constant cosine` is what that constant frame alone scores, the floor any cosine",
        "must be read against.",
        "",
        fidelity_table(report["runs"]),
        "",
        f"![fidelity against queried seconds]({plot.name})",
        "",
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in report.get("timings", {}).items()),
    ]
    if report.get("usage"):
        md += ["", "## What the API charged", "", usage_table(report["usage"])]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    return {"json": out_dir / "report.json", "md": out_dir / "report.md", "plot": plot}


def usage_table(rows: list[dict]) -> str:
    """The server's charges beside the ledgers' payments (rows of who, requests, samples at 16 kHz)."""
    lines = ["| who | requests | audio seconds | samples |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['who']} | {r['requests']} | {r['samples'] / SAMPLE_RATE:.3f} | {r['samples']} |")
    return "\n".join(lines)


# -- grids of runs (speechmimic.experiment) -------------------------------------------------------------


def std(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mean_std(values: list[float], fmt: str = "{:.3f}") -> str:
    """``mean ± std`` over seeds (the value alone for one seed, ``-`` for none)."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ± {fmt.format(std(values))}"


def grid_table(rows: list[dict], extra: dict[str, Callable[[dict], str]] | None = None) -> str:
    """Rows of :meth:`~speechmimic.experiment.Experiment.summarise` as a markdown table: budget,
    strategy, stage-1 arm, seeds, queried seconds and held-out r2 (mean ± std over seeds), then a
    column per ``extra`` entry (header -> the cell text of a row)."""
    extra = extra or {}
    head = ["budget", "strategy", "stage 1", "seeds", "queried s", "held-out r2", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["budget"],
            r["strategy"],
            "yes" if r["stage1"] else "no",
            str(len(r["seeds"])),
            f"{np.mean(r['queried_seconds']):.0f}",
            mean_std(r["r2"]),
            *(cell(r) for cell in extra.values()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_grid(rows: list[dict], path: str | Path, strategies: list[str] | None = None) -> Path:
    """Held-out r2 against queried seconds (mean ± std over seeds) of summary rows, one line per
    strategy (a whole-pool point joins every line); a panel per (target, stage-1 arm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r["target"] for r in rows))
    arms = sorted({r["stage1"] for r in rows}, reverse=True)
    strategies = strategies or list(dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != "all"))
    fig, axes = plt.subplots(
        len(arms),
        len(targets),
        figsize=(6 * len(targets), 4 * len(arms)),
        squeeze=False,
        sharex=True,
        sharey="col",
    )
    colours = dict(zip(strategies, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for col, target in enumerate(targets):
        for row, s1 in enumerate(arms):
            ax = axes[row][col]
            mine = [r for r in rows if r["target"] == target and r["stage1"] == s1]
            full = [r for r in mine if r["strategy"] == "all"]
            for strategy in strategies:
                pts = [r for r in mine if r["strategy"] == strategy] + full
                pts.sort(key=lambda r: r["budget_seconds"])
                if pts:
                    x, y = [np.mean(r["queried_seconds"]) for r in pts], [np.mean(r["r2"]) for r in pts]
                    yerr = [std(r["r2"]) for r in pts]
                    ax.errorbar(
                        x, y, yerr=yerr, marker="o", ms=4, capsize=2, color=colours[strategy], label=strategy
                    )
            seconds = [np.mean(r["queried_seconds"]) for r in mine]
            if seconds and max(seconds) > 2 * min(seconds):  # one budget alone: a log axis shows nothing
                ax.set_xscale("log")
            ax.set_title(f"{target}, {'from stage 1' if s1 else 'from scratch'}", fontsize=10)
            ax.set(xlabel="queried audio (s)", ylabel="held-out r2 (mean over returned layers)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle("Held-out fidelity against queried seconds (mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- downstream probes ---------------------------------------------------------------------------------


def probe_table(results: dict) -> str:
    lines = [
        "| task | metric | target | student | baseline | student/target | recovered share |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rec = "n/a (target not above baseline)" if r["recovered"] is None else f"{r['recovered']:.0%}"
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


def evaluate_and_report(
    target, student, tasks, out_dir: str | Path, report_dir: str | Path | None = None, **options
) -> tuple[dict, dict[str, Path]]:
    """:func:`~speechmimic.evaluate.evaluate` (same arguments), its plots in ``out_dir``, and, with
    ``report_dir``, its results merged into that extraction report; returns (results, plots)."""
    results = evaluate(target, student, tasks, out_dir, **options)
    plots = plot_probes(results, out_dir)
    if report_dir is not None:
        merge_into_report(results, report_dir, plots)
    return results, plots
