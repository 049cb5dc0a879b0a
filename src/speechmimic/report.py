"""Reports of extraction runs: a printed table, ``report.md`` and a plot of fidelity vs queried seconds."""

from __future__ import annotations

import json
from pathlib import Path

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
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    return {"json": out_dir / "report.json", "md": out_dir / "report.md", "plot": plot}
