"""What the audit says, for an owner: per budget, defence and attacker, the stolen student's
recovered share beside the same thief's without the defence; what each defence costs honest
applications; and whether the detector told the thief from them.

``summarise`` turns the grid's records into rows and verdicts (``report.json``), ``write`` renders
``report.md`` with its tables and two plots: recovered share against budget (one line per defence,
a panel per attacker) and benign cost against protection.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from speechmimic.audit.grid import AuditConfig, recovered, uncalibrated
from speechmimic.defences import parse_defences
from speechmimic.defences.prada import Prada

NONE = "none"


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.mean(v)), 4) if v else None


def _alarm(history: list[dict], threshold: float) -> dict:
    """Whether any key's W fell below ``threshold``, and after how many queries and audio-seconds."""
    first = None
    for h in history:
        for i, w in enumerate(h["w"]):
            if w is not None and w < threshold:
                if first is None or h["seconds"][i] < first[1]:
                    first = (i + 1, h["seconds"][i])
                break
    return {
        "alarm": first is not None,
        "after_queries": first and first[0],
        "after_seconds": first and first[1],
    }


def _w_min(history: list[dict]) -> float | None:
    ws = [w for h in history for w in h["w"] if w is not None]
    return round(min(ws), 4) if ws else None


def summarise(result: dict, cfg: AuditConfig) -> dict:
    ref = result["reference"]
    probes = list(ref["target"])
    rows = []
    by = {
        (c["wanted"]["defence"], c["wanted"]["attacker"], c["wanted"]["budget"]): c for c in result["cells"]
    }
    for (defence, attacker, budget), c in by.items():
        shares = recovered(ref, c["probes"])
        base = by.get((NONE, attacker, budget))
        base_share = _mean(recovered(ref, base["probes"]).values()) if base else None
        mean = _mean(shares.values())
        hours = c["spent_seconds"] / 3600
        row = {
            "defence": defence, "attacker": attacker, "budget": budget,
            "answered": c["answered"], "selected": c["selected"], "spent_seconds": c["spent_seconds"],
            "recovered": shares, "recovered_mean": mean,
            "recovered_without_defence": base_share,
            "recovered_per_query_hour": round(mean / hours, 3) if mean is not None and hours else None,
            "keys": c["keys"],
        }  # fmt: skip
        if c.get("proof"):
            row["proof"] = _proof(c["proof"])
        if "server_charged_seconds" in c:  # over HTTP: what the API itself charged these keys
            row["server_charged_seconds"] = c["server_charged_seconds"]
        if c.get("detector"):
            row["detector"] = {
                "w_min": _w_min(c["detector"]),
                **_alarm(c["detector"], _threshold(cfg, defence)),
            }
        rows.append(row)
    benign = {}
    for defence, b in result["benign"].items():
        clean_of = {app: result["benign"].get(NONE, b)["apps"][app]["clean"] for app in b["apps"]}
        apps = {}
        for app, a in b["apps"].items():
            apps[app] = {
                "task": a["task"],
                "clean": clean_of[app],
                "defended": a["defended"],
                "cost_points": round(100 * (clean_of[app] - a["defended"]), 2),
                "refused": a["refused"],
            }
            if a["detector"]:
                alarms = [_alarm([h], _threshold(cfg, defence))["alarm"] for h in a["detector"]]
                apps[app]["streams"] = len(alarms)
                apps[app]["streams_flagged"] = int(sum(alarms))
        benign[defence] = apps
    detection = {d: _detection(result, cfg, d) for d in cfg.defences if _threshold(cfg, d) is not None}
    return {
        "probes": probes,
        "reference": {
            p: {"target": max(ref["target"][p].values()), "mfcc": max(ref["mfcc"][p].values())}
            for p in probes
        },
        "rows": rows,
        "benign": benign,
        "detection": detection,
        "verdicts": _verdicts(rows, benign),
        **({"watermark_cost": _mark_cost(ref)} if "original" in ref else {}),
    }


def _proof(found: dict) -> dict:
    out = {"dataset_inference_p": found["dataset_inference"]["p_value"]}
    if "watermark" in found:
        w = found["watermark"]
        # the fingerprint's statistic is a share of clips, the answer mark's a z in null deviations
        stat = w["z"] if w.get("kind") == "answer mark" else w["share"]
        out.update(watermark=w["verdict"], watermark_stat=stat, watermark_p=w["p_value"])
    return out


def _mark_cost(ref: dict) -> dict:
    """Per probe: the unmarked original's and the marked target's best score, and the difference in points."""
    out = {}
    for p in ref["target"]:
        before, after = max(ref["original"][p].values()), max(ref["target"][p].values())
        out[p] = {"original": before, "marked": after, "cost_points": round(100 * (before - after), 2)}
    return out


def _threshold(cfg: AuditConfig, defence: str) -> float | None:
    chain = cfg.defences[defence]
    if "prada" not in chain:
        return None
    for d in parse_defences(uncalibrated(chain)):
        if isinstance(d, Prada):
            return d.o["threshold"]
    return None


def _detection(result: dict, cfg: AuditConfig, defence: str) -> dict:
    """The detector's statistic on attack and benign streams; its configured threshold's measured
    false-positive rate, and the threshold that keeps it at ``cfg.fpr`` with the true-positive rate there."""
    benign = [h for a in result["benign"][defence]["apps"].values() for h in (a["detector"] or [])]
    attacks = [
        c["detector"] for c in result["cells"] if c["wanted"]["defence"] == defence and c.get("detector")
    ]
    benign_min = sorted(_w_min([h]) for h in benign if _w_min([h]) is not None)
    attack_min = [_w_min(h) for h in attacks]
    configured = _threshold(cfg, defence)

    def rates(t: float) -> dict:
        fp = sum(w < t for w in benign_min)
        tp = [_alarm(h, t) for h in attacks]
        caught = [a for a in tp if a["alarm"]]
        return {
            "threshold": round(t, 4),
            "fpr": round(fp / len(benign_min), 3) if benign_min else None,
            "tpr": round(len(caught) / len(attacks), 3) if attacks else None,
            "median_delay_queries": float(np.median([a["after_queries"] for a in caught]))
            if caught
            else None,
            "median_delay_seconds": float(np.median([a["after_seconds"] for a in caught]))
            if caught
            else None,
        }

    k = int(np.floor(cfg.fpr * len(benign_min)))
    stated = benign_min[k] if benign_min and k < len(benign_min) else None  # W < this: at most k streams
    return {
        "benign_streams": len(benign_min),
        "attack_streams": len(attacks),
        "benign_w_min": benign_min,
        "attack_w_min": attack_min,
        "configured": rates(configured),
        f"at_fpr_{cfg.fpr:g}": rates(stated) if stated is not None else None,
    }


def _verdicts(rows: list[dict], benign: dict) -> list[str]:
    out = []
    for r in rows:
        if r["defence"] == NONE or r["attacker"] != "naive":
            continue
        base, got = r["recovered_without_defence"], r["recovered_mean"]
        cost = max((a["cost_points"] for a in benign.get(r["defence"], {}).values()), default=None)
        if base is None or got is None or cost is None:
            continue
        if got <= base / 2 and cost <= 2:
            adaptive = [x for x in rows if (x["defence"], x["budget"]) == (r["defence"], r["budget"])
                        and x["attacker"] != "naive"]  # fmt: skip
            back = (
                ", ".join(f"{x['attacker']} {x['recovered_mean']}" for x in adaptive)
                or "no adaptive attacker run"
            )
            out.append(
                f"{r['defence']} at {r['budget']}: naive thief's recovered share {got} (without it {base}), "
                f"honest cost at most {cost} points; adaptive thieves: {back}"
            )
    if not out:
        out.append("no defence halved the naive thief's recovered share at 2 points of honest cost or less")
    return out


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def write(summary: dict, out: str | Path, title: str) -> dict[str, Path]:
    out = Path(out)
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    plots = _plots(summary, out)
    probes = summary["probes"]
    lines = [f"# {title}", ""]
    lines += ["Recovered share = (student - MFCC) / (target - MFCC) on each probe (best state; "
              "verification scored as 1 - EER); 1 is a perfect copy, 0 no better than MFCC.", "",
              "| probe | target | MFCC |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {p} | {v['target']:.3f} | {v['mfcc']:.3f} |" for p, v in summary["reference"].items()]
    lines += ["", "## What each thief stole", "",
              "| defence | attacker | budget | answered | query s | " + " | ".join(probes)
              + " | mean | without defence | per query-hour | alarm (queries / s) |",
              "|---" * (9 + len(probes)) + "|"]  # fmt: skip
    for r in summary["rows"]:
        d = r.get("detector")
        alarm = (
            "-"
            if d is None
            else (f"yes ({d['after_queries']} / {d['after_seconds']:.0f})" if d["alarm"] else "no")
        )
        lines.append(
            f"| {r['defence']} | {r['attacker']} | {r['budget']} | {r['answered']} | "
            f"{r['spent_seconds']:.0f} | "
            + " | ".join(_f(r["recovered"][p]) for p in probes)
            + f" | **{_f(r['recovered_mean'])}** | {_f(r['recovered_without_defence'])} | "
            f"{_f(r['recovered_per_query_hour'], '{:.1f}')} | {alarm} |"
        )
    charged = [r for r in summary["rows"] if "server_charged_seconds" in r]
    if charged:
        paid = sum(r["spent_seconds"] for r in charged)
        billed = sum(r["server_charged_seconds"] for r in charged)
        lines += ["", f"Over HTTP: the thieves' ledgers paid {paid:.1f} audio-seconds, the servers charged "
                  f"their keys {billed:.1f}."]  # fmt: skip
    lines += ["", "## What each defence costs honest applications", "",
              "Task score of each application on the answers it receives (accuracy, or 1 - EER), its "
              "full traffic through one key; a refused request counts as a failed one.", "",
              "| defence | application | clean | defended | cost (points) | refused | flagged streams |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for d, apps in summary["benign"].items():
        for app, a in apps.items():
            flagged = f"{a['streams_flagged']} / {a['streams']}" if "streams" in a else "-"
            lines.append(
                f"| {d} | {app} | {a['clean']:.3f} | {a['defended']:.3f} | {a['cost_points']:.1f} | "
                f"{a['refused']} | {flagged} |"
            )
    if summary["detection"]:
        lines += ["", "## Who gets caught", "",
                  "The detector's Shapiro-Wilk W of each key's minimum distances (lowest over its stream): "
                  "an alarm is W below the threshold. The false-positive rate is measured on the honest "
                  "streams (random halves of each application's traffic, one key each).", "",
                  "| defence | threshold | FPR (honest streams) | TPR (thieves) "
                  "| median delay (queries / s) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for d, det in summary["detection"].items():
            for name, r in det.items():
                if isinstance(r, dict):
                    q, sec = r["median_delay_queries"], r["median_delay_seconds"]
                    delay = f"{_f(q, '{:.0f}')} / {_f(sec, '{:.0f}')}"
                    lines.append(
                        f"| {d} ({name}) | {r['threshold']:.4f} | {_f(r['fpr'])} | {_f(r['tpr'])} | {delay} |"
                    )
            lines.append(
                f"| {d}: W min, honest | {', '.join(f'{w:.3f}' for w in det['benign_w_min'])} | | | |"
            )
            lines.append(
                f"| {d}: W min, thieves | {', '.join(_f(w, '{:.3f}') for w in det['attack_w_min'])} | | | |"
            )
    proofs = [r for r in summary["rows"] if "proof" in r]
    if proofs or "watermark_cost" in summary:
        lines += ["", "## Proof of theft", "",
                  "Each stolen copy tested for the owner's watermark (statistic: for the answer mark, how "
                  "far its reactions lean toward the secret key, in standard deviations of the null; for "
                  "the fingerprint, the share of triggered clips decoding to the key; p-value under the "
                  "null of a model made without the secret) and by dataset inference (p-value that it is "
                  "more at home on the owner's held-out clips than on pool clips the thief never paid "
                  "for).", "",
                  "| defence | attacker | budget | watermark statistic | watermark p | verdict "
                  "| dataset inference p |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in proofs:
            p = r["proof"]
            lines.append(
                f"| {r['defence']} | {r['attacker']} | {r['budget']} | {_f(p.get('watermark_stat'))} | "
                f"{_f(p.get('watermark_p'), '{:.2g}')} | {p.get('watermark', '-')} | "
                f"{p['dataset_inference_p']:.2g} |"
            )
        tested = [r["proof"]["watermark"] for r in proofs if "watermark" in r["proof"]]
        if tested:
            found = sum(v == "watermark found" for v in tested)
            lines += [
                "",
                f"Copies found: {found} of {len(tested)} (the true-positive rate at p < 0.01; the "
                "false-positive rate on trained independent models: benchmarks/watermark.py).",
            ]
        if "watermark_cost" in summary:
            lines += ["", "What the mark costs the owner (best state of each probe):", "",
                      "| probe | unmarked | marked | cost (points) |", "|---|---|---|---|"]  # fmt: skip
            lines += [f"| {p} | {c['original']:.3f} | {c['marked']:.3f} | {c['cost_points']:.1f} |"
                      for p, c in summary["watermark_cost"].items()]  # fmt: skip
    lines += ["", "## Verdicts", ""] + [f"- {v}" for v in summary["verdicts"]]
    lines += [
        "",
        "![recovered share against budget](recovered.png)",
        "",
        "![cost against protection](cost.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return {"json": out / "report.json", "md": out / "report.md", **plots}


def _plots(summary: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    attackers = sorted({r["attacker"] for r in rows}, key=lambda a: (a != "naive", a))
    fig, axes = plt.subplots(1, len(attackers), figsize=(5 * len(attackers), 4), squeeze=False, sharey=True)
    for ax, attacker in zip(axes[0], attackers, strict=True):
        for defence in dict.fromkeys(r["defence"] for r in rows):
            mine = [r for r in rows if (r["attacker"], r["defence"]) == (attacker, defence)]
            pts = sorted(
                (r["spent_seconds"], r["recovered_mean"]) for r in mine if r["recovered_mean"] is not None
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), marker="o", label=defence, lw=2.5 if defence == NONE else 1.2
                )
        ax.set_title(f"attacker: {attacker}")
        ax.set_xlabel("audio-seconds paid")
        ax.axhline(0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("recovered share (mean over probes)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recovered.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        if r["attacker"] != "naive" or r["defence"] == NONE or r["recovered_mean"] is None:
            continue
        base = r["recovered_without_defence"]
        cost = max((a["cost_points"] for a in summary["benign"].get(r["defence"], {}).values()), default=0)
        if base:
            ax.scatter(cost, 1 - r["recovered_mean"] / base)
            ax.annotate(f"{r['defence']} {r['budget']}", (cost, 1 - r["recovered_mean"] / base), fontsize=7)
    ax.axvline(2, color="grey", ls="--", lw=0.7)
    ax.axhline(0.5, color="grey", ls="--", lw=0.7)
    ax.set_xlabel("honest cost, worst application (points)")
    ax.set_ylabel("protection: 1 - recovered / recovered without defence")
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=120)
    plt.close(fig)
    return {"recovered_plot": out / "recovered.png", "cost_plot": out / "cost.png"}
