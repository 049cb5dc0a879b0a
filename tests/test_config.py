"""Typed configs: one source for defaults, help and flags; JSON round trips; clear errors."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from speechmimic import config
from speechmimic.cli import build_parser, main
from speechmimic.distill import DistillConfig
from speechmimic.extract import ExtractConfig
from speechmimic.pretrain import PretrainConfig
from speechmimic.trainer import TrainConfig


def test_stages_share_the_loop_settings():
    loop = {f.name for f in dataclasses.fields(TrainConfig)}
    assert loop <= {f.name for f in dataclasses.fields(DistillConfig)}
    assert loop <= {f.name for f in dataclasses.fields(PretrainConfig)}
    assert PretrainConfig().warmup == 200 and DistillConfig().warmup == 100  # each stage its defaults


def test_round_trip_and_errors():
    cfg = ExtractConfig(
        budget="10%", strategy="hybrid", stage1=PretrainConfig(k=7), distill=DistillConfig(lr=0.5)
    )
    data = json.loads(json.dumps(config.to_dict(cfg)))
    assert config.from_dict(ExtractConfig, data) == cfg
    assert config.from_dict(DistillConfig, {"lr": 1}).lr == 1.0  # JSON ints where floats are meant
    with pytest.raises(ValueError, match=r"unknown PretrainConfig setting\(s\) \['kk'\]"):
        config.from_dict(ExtractConfig, {"budget": "5", "stage1": {"kk": 3}})
    with pytest.raises(ValueError, match="DistillConfig.steps must be int"):
        config.from_dict(DistillConfig, {"steps": "many"})
    with pytest.raises(ValueError, match=r"needs the setting\(s\) \['budget'\]"):
        config.from_dict(ExtractConfig, {})
    with pytest.raises(ValueError, match="not both"):
        ExtractConfig(budget="5", init="somewhere", stage1=PretrainConfig())
    with pytest.raises(ValueError, match="unknown strategy"):
        ExtractConfig(budget="5", strategy="psychic")


def _help(*command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return sub.choices[command[0]].format_help()


def test_flags_come_from_the_fields():
    cases = [("distill", DistillConfig, ""), ("pretrain", PretrainConfig, "")]
    cases += [("extract", DistillConfig, ""), ("extract", PretrainConfig, "stage1-")]
    for command, cls, prefix in cases:
        text = _help(command)
        for f in dataclasses.fields(cls):
            if prefix and f.name in ("seed", "device", "checkpoint_every"):
                continue  # shared with stage 2 on the extract command line
            flag = "--" + (prefix + f.name).replace("_", "-")
            assert flag in text, (command, flag)
    assert re.search(r"--warmup N\s+linear warm-up steps \(default: 200\)", _help("pretrain"))


def test_pretrain_config_file_and_print_config(tmp_path, capsys):
    (tmp_path / "cfg.json").write_text(json.dumps({"k": 12, "steps": 30}))
    args = ["pretrain", "--manifest", "m", "--out", "o", "--config", str(tmp_path / "cfg.json"), "--k", "9"]
    assert main([*args, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {**config.to_dict(PretrainConfig()), "k": 9, "steps": 30}
