"""The s3prl-style upstream over students, baselines and targets; a target answers through a ledger."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechmimic import load_upstream
from speechmimic.ledger import Ledger
from speechmimic.student import Student, predict
from speechmimic.targets import load_backend
from speechmimic.targets.registry import _KINDS
from speechmimic.testing import CountingTarget


def test_student_upstream_is_the_saved_student(tiny_student):
    directory, _, clips = tiny_student
    student, _ = Student.load(directory)
    upstream = load_upstream(directory)
    wavs = [torch.from_numpy(c.load()) for c in clips[:3]]
    out = upstream(wavs)["hidden_states"]
    assert upstream.hidden_state_names == [
        "student.frontend",
        "student.layer1",
        "pred.lstm1",
        "pred.lstm2",
        "pred.lstm3",
    ]
    assert upstream.downsample_rate == 160
    assert all(h.shape[0] == 3 and h.shape[1] == max(len(w) for w in wavs) // 160 + 1 for h in out)
    # The stolen representations are exactly what the student predicts for each clip alone.
    for i, wav in enumerate(wavs):
        pred = predict(student, wav)
        n = len(pred["lstm3"])
        assert torch.equal(out[4][i, :n], pred["lstm3"])
    again = load_upstream(directory)(wavs)["hidden_states"]
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))


def test_target_upstream_pays_through_its_ledger_once(tmp_path, speech_clips):
    pool, _ = speech_clips
    wavs = [torch.from_numpy(c.load()) for c in pool[:3]]
    counting = CountingTarget(load_backend("resemblyzer?layers=1,3"))
    upstream = load_upstream(counting, ledger=tmp_path / "ledger")
    assert upstream.hidden_state_names == ["lstm1", "lstm3"] and upstream.downsample_rate == 160
    out = upstream(wavs[:1])["hidden_states"]
    direct = counting.inner([wavs[0].numpy()])[0]
    # the stored answer, as the ledger keeps it (float16 by default)
    assert np.array_equal(out[1][0].numpy(), direct["lstm3"].astype(np.float16).astype(np.float32))
    assert counting.clips == 1
    upstream(wavs)  # one clip already answered: only the two new ones are sent
    assert counting.clips == 3 and len(Ledger(tmp_path / "ledger")) == 3
    # A spec over the same ledger reads the stored answers without asking (or loading) the target.
    by_spec = load_upstream("resemblyzer?layers=1,3", ledger=tmp_path / "ledger")
    again = by_spec(wavs)["hidden_states"]
    n = out[1].shape[1]
    assert again[1][0, :n].equal(out[1][0]) and counting.clips == 3 and by_spec._target is None


def test_a_target_without_a_ledger_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ledger"):
        load_upstream("resemblyzer")
    assert load_upstream("mfcc").hidden_state_names == ["mfcc"]  # baselines pay nothing


def test_a_mistyped_student_folder_is_not_taken_for_a_target(tmp_path):
    typo = str(tmp_path / "studnet")
    with pytest.raises(ValueError) as e:
        load_upstream(typo)
    assert str(e.value) == (
        f"'{typo}' is no such folder (a student), and not a target spec: unknown target kind "
        f"'{typo}' in spec '{typo}'; valid kinds: {sorted(_KINDS)}"
    )
