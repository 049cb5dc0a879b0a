"""Issue-level checks of the probes on real speech (slow: ~2 min). Skip where the data is absent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from speechmimic.probe import probe
from speechmimic.recipes import espeak, shared

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_tasks(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"real speech subsets are absent: {DATA} (see shared/data/README.md)")
    out = tmp_path_factory.mktemp("shared")
    return {t.name: t for t in shared.build(DATA, out / "tasks", progress=False)}, out / "cache"


@pytest.mark.parametrize("task", ["digits", "sid"])
def test_resemblyzer_solves_digits_and_ten_speakers(shared_tasks, task):
    tasks, cache = shared_tasks
    target = probe(
        "resemblyzer?layers=all", tasks[task], cache_dir=cache, progress=False, ledger=cache / "ledger"
    )
    mfcc = probe("mfcc", tasks[task], cache_dir=cache, progress=False)
    assert target["test"] >= 0.95, target
    assert mfcc["test"] > target["baselines"]["majority"]  # the baseline is a real one, shown beside it


def test_phone_ctc_beats_blank_and_unigram(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    (task,) = espeak.build(tmp_path / "espeak", n_utterances=600, seed=0, progress=False)
    result = probe(
        "resemblyzer?layers=all",
        task,
        cache_dir=tmp_path / "cache",
        progress=False,
        ledger=tmp_path / "ledger",
    )
    assert result["test"] < 0.5 * min(result["baselines"].values()), result
