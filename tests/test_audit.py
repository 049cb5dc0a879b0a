"""A tiny audit end to end on the shipped corpus and the real resemblyzer: every cell is a real
extraction, the report says for each defence what the thief got with and without it, what honest
applications paid and whether the detector fired, and a rerun resumes without redoing anything."""

from __future__ import annotations

import json

import pytest

from speechmimic import config
from speechmimic.audit import ATTACKERS
from speechmimic.audit.grid import Audit, AuditConfig
from speechmimic.audit.report import summarise, write
from speechmimic.audit.suites import Suite, demo_suite
from speechmimic.cli import main
from speechmimic.defences import load_target
from speechmimic.probe.pooled import ProbeSet


def thin(ps: ProbeSet, speakers: set[str]) -> ProbeSet:
    keep = [i for i, c in enumerate(ps.clips) if c.labels["speaker"] in speakers]
    groups = [ps.groups[i] for i in keep] if ps.groups else None
    return ProbeSet(ps.name, [ps.clips[i] for i in keep], [ps.labels[i] for i in keep], groups, ps.task)


@pytest.fixture(scope="module")
def suite() -> Suite:
    full = demo_suite()
    speakers = sorted({c.labels["speaker"] for c in full.heldout})[:8]
    return Suite(
        "demo-thin",
        full.pool,
        full.heldout,
        {k: thin(v, set(speakers)) for k, v in full.probes.items()},
        {k: thin(v, set(speakers)) for k, v in full.benign.items()},
    )


def test_a_tiny_audit_reports_every_cell_honestly_and_resumes(tmp_path, suite):
    cfg = AuditConfig(
        budgets=["10%"],
        defences={
            "none": "",
            "transform": "transform?kind=rotate&seed=1",
            "strict prada": "prada?threshold=0.995&min_queries=5&action=refuse",
        },
        attackers=["naive", "sybils"],
        steps=5,
        streams=2,
    )
    audit = Audit(load_target("resemblyzer?layers=all"), suite, tmp_path, cfg, progress=False)
    summary = summarise(audit.run(), cfg)
    paths = write(summary, tmp_path, "tiny audit")
    rows = {(r["defence"], r["attacker"]): r for r in summary["rows"]}
    assert set(rows) == {(d, a) for d in cfg.defences for a in cfg.attackers}
    for (_, attacker), r in rows.items():
        assert set(r["recovered"]) == set(suite.probes)
        assert r["recovered_without_defence"] == rows[("none", attacker)]["recovered_mean"]
    # sybils pay the anchors through their other three keys on top of the clips
    assert rows[("none", "sybils")]["spent_seconds"] > rows[("none", "naive")]["spent_seconds"]
    # a rotation per key costs honest applications (nearly) nothing; no defence costs exactly nothing
    for app in suite.benign:
        assert summary["benign"]["none"][app]["cost_points"] == 0
        assert abs(summary["benign"]["transform"][app]["cost_points"]) <= 3
    # the strict detector refuses the thief part-way and flags honest streams too: the report says so
    strict = rows[("strict prada", "naive")]
    assert strict["detector"]["alarm"] and strict["answered"] < strict["selected"]
    det = summary["detection"]["strict prada"]
    assert det["benign_streams"] == 2 * (1 + cfg.streams) and det["configured"]["fpr"] > 0
    assert det["configured"]["tpr"] == 1.0
    report = paths["md"].read_text()
    assert "| strict prada | naive | 10% |" in report and "recovered.png" in report
    assert paths["recovered_plot"].stat().st_size > 0 and paths["cost_plot"].stat().st_size > 0
    assert json.loads(paths["json"].read_text())["rows"] == json.loads(json.dumps(summary["rows"]))
    # a rerun reads every cell back instead of training again
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("cells/*/*/*/cell.json")}
    assert len(stamps) == len(rows)
    again = Audit(load_target("resemblyzer?layers=all"), suite, tmp_path, cfg, progress=False).run()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert summarise(again, cfg)["rows"] == summary["rows"]


def test_over_http_each_thief_pays_a_served_defence_and_the_server_charges_what_the_ledgers_paid(
    tmp_path, suite
):
    cfg = AuditConfig(
        budgets=["10%"],
        defences={"none": "", "strict prada": "prada?threshold=0.995&min_queries=5&action=refuse"},
        steps=3,
        streams=1,
        http=True,
    )
    audit = Audit(load_target("resemblyzer?layers=all"), suite, tmp_path, cfg, progress=False)
    summary = summarise(audit.run(), cfg)
    rows = {r["defence"]: r for r in summary["rows"]}
    for r in rows.values():  # every paid clip was charged once by the API, and nothing more
        assert r["server_charged_seconds"] == pytest.approx(r["spent_seconds"], abs=0.01)
    strict = rows["strict prada"]  # the server refused the flagged key (403), so the ledger holds less
    assert strict["detector"]["alarm"] and strict["answered"] < strict["selected"]
    assert rows["none"]["answered"] == rows["none"]["selected"]
    assert not any(p.read_text() == "" for p in tmp_path.glob("servers/*/port"))
    assert "Over HTTP" in write(summary, tmp_path, "http audit")["md"].read_text()


def test_audit_refuses_bad_settings_before_running(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown attackers"):
        AuditConfig(budgets=["10%"], defences={"none": ""}, attackers=["ninja"])
    with pytest.raises(ValueError, match="unknown defence 'nose'"):
        AuditConfig(budgets=["10%"], defences={"typo": "nose?snr=3"})
    assert main(["audit", "--out", str(tmp_path), "--defence", "noisy"]) == 2
    assert "expected NAME=CHAIN" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
    assert set(ATTACKERS) >= {"naive", "sybils", "augment"}


def test_audit_settings_come_from_flags_a_file_or_an_earlier_report(tmp_path, capsys):
    out = str(tmp_path / "audit")
    flags = ["--budgets", "5%,20%", "--attackers", "naive", "--steps", "7", "--defence", "noisy=noise?snr=5"]
    assert main(["audit", "--out", out, *flags, "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg == {
        **config.to_dict(AuditConfig()),
        "budgets": ["5%", "20%"],
        "attackers": ["naive"],
        "steps": 7,
        "defences": {"noisy": "noise?snr=5"},
    }
    report = tmp_path / "report.json"  # an audit's report.json records its config under "config"
    report.write_text(json.dumps({"rows": [], "config": cfg}))
    assert main(["audit", "--out", out, "--config", str(report), "--steps", "9", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == {**cfg, "steps": 9}  # flags beside the file win
    assert main(["audit", "--out", out, "--budgets", "0%", "--print-config"]) == 2
    assert "budget" in capsys.readouterr().err
    assert not (tmp_path / "audit").exists()
