"""The command line: every option explained, and each stage runnable alone on the previous one's files."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechmimic.cli import build_parser, main
from speechmimic.corpus import read_manifest


def _parsers(parser: argparse.ArgumentParser, path=("speechmimic",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_of_every_command_is_explained():
    seen = []
    for path, parser in _parsers(build_parser()):
        assert parser.description or len(path) == 1, f"{' '.join(path)} has no description"
        assert parser.format_help()  # every help text renders (a stray '%' would raise)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 10, f"{' '.join(path)}: {action.dest} has no help"
        seen.append(" ".join(path[1:]))
    assert {"demo", "corpus scan", "select", "query", "distill", "extract", "fidelity", "embed"} <= set(seen)


def test_help_runs_from_the_shell():
    out = subprocess.run([sys.executable, "-m", "speechmimic", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "extract" in out.stdout and "demo" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "speechmimic", "extract", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--budget" in out.stdout and "--strategy" in out.stdout


def test_the_command_loads_no_library_it_does_not_need():
    # scipy.stats and scikit-learn add 100 MB to every command's memory; only a few commands use them.
    code = "import sys, speechmimic.cli; print(sorted({'scipy.stats', 'sklearn'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_stages_chain_from_the_command_line(tmp_path, speech_clips, capsys):
    pool, heldout = speech_clips
    audio = tmp_path / "audio"
    audio.mkdir()
    for clip in pool[:12] + heldout[:3]:
        sf.write(audio / f"{clip.id}.flac", clip.load(), 16000)
    held_ids = {c.id for c in heldout[:3]}

    assert main(["corpus", "scan", str(audio), "--out", str(tmp_path / "all.jsonl"), "--no-progress"]) == 0
    clips = read_manifest(tmp_path / "all.jsonl")
    assert len(clips) == 15
    from speechmimic.corpus import write_manifest

    write_manifest([c for c in clips if c.id not in held_ids], tmp_path / "pool.jsonl")
    write_manifest([c for c in clips if c.id in held_ids], tmp_path / "heldout.jsonl")

    assert (
        main(
            [
                "select",
                "--manifest",
                str(tmp_path / "pool.jsonl"),
                "--budget",
                "50%",
                "--out",
                str(tmp_path / "sel.jsonl"),
            ]
        )
        == 0
    )
    selected = read_manifest(tmp_path / "sel.jsonl")
    total = sum(c.duration for c in read_manifest(tmp_path / "pool.jsonl"))
    assert 0 < sum(c.duration for c in selected) <= total / 2
    capsys.readouterr()

    q = [
        "query",
        "--target",
        "resemblyzer?layers=all",
        "--manifest",
        str(tmp_path / "sel.jsonl"),
        "--ledger",
        str(tmp_path / "ledger"),
        "--no-progress",
    ]
    assert main(q) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["paid"] == len(selected) and first["in_doubt"] == 0
    assert main(q) == 0  # a rerun pays nothing
    again = json.loads(capsys.readouterr().out)
    assert again["paid"] == 0 and again["reused"] == len(selected)

    assert (
        main(
            [
                "distill",
                "--manifest",
                str(tmp_path / "sel.jsonl"),
                "--ledger",
                str(tmp_path / "ledger"),
                "--out",
                str(tmp_path / "student"),
                "--preset",
                "tiny",
                "--steps",
                "4",
                "--warmup",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "student" / "model.safetensors").exists()
    assert (tmp_path / "student" / "config.json").exists()

    assert (
        main(
            [
                "fidelity",
                "--student",
                str(tmp_path / "student"),
                "--target",
                "resemblyzer?layers=all",
                "--manifest",
                str(tmp_path / "heldout.jsonl"),
                "--eval-ledger",
                str(tmp_path / "eval"),
                "--out",
                str(tmp_path / "fid.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    fid = json.loads((tmp_path / "fid.json").read_text())
    assert set(fid) == {"lstm1", "lstm2", "lstm3"}
    assert all({"cosine", "l1", "r2", "constant_cosine"} <= set(v) for v in fid.values())

    files = [str(audio / f"{c.id}.flac") for c in heldout[:2]]
    assert (
        main(["embed", "--model", str(tmp_path / "student"), "--out", str(tmp_path / "e.npz"), *files]) == 0
    )
    npz = np.load(tmp_path / "e.npz")
    names = list(npz["names"])
    assert names[-3:] == ["pred.lstm1", "pred.lstm2", "pred.lstm3"]
    assert npz["0/pred.lstm3"].shape[1] == 256 and int(npz["downsample_rate"]) == 160


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "m.jsonl"
    bad.write_text("{not json\n")
    assert main(["select", "--manifest", str(bad), "--budget", "3", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "m.jsonl:1" in capsys.readouterr().err
    assert (
        main(["query", "--target", "nosuch:x", "--manifest", str(bad), "--ledger", str(tmp_path / "l")]) == 2
    )
    with pytest.raises(SystemExit):
        main(["select", "--manifest", str(bad)])  # --budget and --out missing: argparse explains


MANIFEST = Path(__file__).resolve().parents[1] / "src/speechmimic/data/demo_corpus/manifest.jsonl"
# `speechmimic select` on the shipped corpus, with a bug planted inside the stage (a KeyError).
_BUGGY = """
import sys
import speechmimic.cli.select as stage
def buggy(*args, **kwargs):
    raise KeyError("planted bug")
stage.select_from_manifest = buggy
from speechmimic.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_user_error_is_one_line_and_a_bug_shows_its_traceback(tmp_path, capsys):
    out = str(tmp_path / "chosen.jsonl")
    missing = ["select", "--manifest", str(tmp_path / "missing.jsonl"), "--budget", "10%", "--out", out]
    # user errors: a missing file, a bad target spec -> one line, status 2
    for args in (
        missing,
        ["query", "--target", "nothing:x", "--manifest", str(MANIFEST), "--ledger", str(tmp_path / "l")],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"speechmimic {args[0]}: error: "), err
    # a bad flag value: argparse's usage, then one line of error, status 2
    with pytest.raises(SystemExit) as e:
        main(["select", "--manifest", str(MANIFEST), "--budget", "1e9h", "--out", out])
    assert e.value.code == 2 and "error: argument --budget: budget '1e9h'" in capsys.readouterr().err
    # --traceback (anywhere on the line) lets the error through, with its traceback
    for args in (["--traceback", *missing], [*missing, "--traceback"]):
        with pytest.raises(FileNotFoundError):
            main(args)
    # a bug, as a user meets it from the shell: the traceback, status 1
    bug = ["select", "--manifest", str(MANIFEST), "--budget", "10%", "--out", out]
    r = subprocess.run([sys.executable, "-c", _BUGGY, *bug], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert "KeyError: 'planted bug'" in r.stderr
