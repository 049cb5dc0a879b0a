"""SUPERB-style probes: baseline upstreams, the feature cache, heads, metrics, training, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from speechmimic import config
from speechmimic.baselines import FbankUpstream, MFCCUpstream
from speechmimic.cli import probe as probe_cli
from speechmimic.probe import CTCHead, FeatureStore, Featurizer, ProbeConfig, UtteranceHead, probe
from speechmimic.probe import features as features_mod
from speechmimic.probe.metrics import accuracy, ctc_greedy_decode, edit_distance, error_rate, words
from speechmimic.recipes import librispeech
from speechmimic.recipes.demo import demo_corpus
from speechmimic.tasks import write_task
from speechmimic.upstream import load_upstream

RESEMBLYZER = "resemblyzer?layers=all"
# Hand-written phone strings (SAMPA-like) for the shipped keywords: a real CTC learning problem.
PHONES = {
    "yes": "j E s",
    "no": "n oU",
    "up": "V p",
    "down": "d aU n",
    "left": "l E f t",
    "right": "r aI t",
    "on": "A n",
    "off": "O f",
    "stop": "s t A p",
    "go": "g oU",
}
DEV_KEYWORDS = ("yes", "no", "up", "down", "left")


@pytest.fixture(autouse=True)
def _one_thread():
    # Every op here is tiny: intra-op threads only add synchronisation (very costly on a busy machine).
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Keyword, speaker and phone tasks from the shipped corpus, split so no test clip is seen in training."""
    root = tmp_path_factory.mktemp("tasks")
    pool, heldout = demo_corpus()
    clips = pool + heldout
    speakers = sorted({c.labels["speaker"] for c in clips})
    test_spk, dev_spk = set(speakers[::6]), set(speakers[1::6])
    keywords = [c for c in clips if c.labels["kind"] == "keyword"]

    def by_speaker(cs):  # unseen speakers at dev and test time
        return {
            "train": [c for c in cs if c.labels["speaker"] not in test_spk | dev_spk],
            "dev": [c for c in cs if c.labels["speaker"] in dev_spk],
            "test": [c for c in cs if c.labels["speaker"] in test_spk],
        }

    second_take = [c for c in keywords if c.id.endswith("-1")]
    speaker_splits = {  # every speaker in every split; test words differ from dev words
        "train": [c for c in clips if c.labels["kind"] == "sentence" or c.id.endswith("-0")],
        "dev": [c for c in second_take if c.labels["keyword"] in DEV_KEYWORDS],
        "test": [c for c in second_take if c.labels["keyword"] not in DEV_KEYWORDS],
    }
    phone_clips = [
        dataclasses.replace(c, labels=c.labels | {"phones": PHONES[c.labels["keyword"]]}) for c in keywords
    ]
    sentences = [c for c in clips if c.labels["kind"] == "sentence"]
    write_task(root / "kw", "kw", "classify", "keyword", by_speaker(keywords))
    write_task(root / "spk", "spk", "classify", "speaker", speaker_splits)
    write_task(root / "ph", "ph", "phones", "phones", by_speaker(phone_clips))
    write_task(root / "asr", "asr", "chars", "text", by_speaker(sentences))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    """Where the target's answers are recorded (the features cache sits above it)."""
    return tmp_path_factory.mktemp("ledger")


class CountingMFCC(MFCCUpstream):
    def __init__(self, spec: str = "mfcc-counting"):
        super().__init__()
        self.spec = spec
        self.calls = 0

    def forward(self, wavs):
        self.calls += 1
        return super().forward(wavs)


# ---------------------------------------------------------------- baselines


def test_mfcc_and_fbank_contract():
    wav = torch.randn(12345) * 0.1
    mfcc = load_upstream("mfcc")
    assert isinstance(mfcc, MFCCUpstream) and mfcc.downsample_rate == 160
    (h,) = mfcc([wav])["hidden_states"]
    assert h.shape == (1, 12345 // 160 + 1, 39) and torch.isfinite(h).all()
    assert mfcc.hidden_state_names == ["mfcc"]
    (f,) = load_upstream("fbank")([wav])["hidden_states"]
    assert isinstance(load_upstream("fbank"), FbankUpstream) and f.shape == (1, 12345 // 160 + 1, 80)
    # Batched clips are encoded one by one: padding never changes the shorter clip.
    (both,) = mfcc([wav, wav[:4000]])["hidden_states"]
    (short,) = mfcc([wav[:4000]])["hidden_states"]
    assert torch.allclose(both[1, : short.shape[1]], short[0]) and (both[1, short.shape[1] :] == 0).all()
    (c,) = load_upstream("mfcc+cmvn")([wav])["hidden_states"]
    assert torch.allclose(c[0].mean(0), torch.zeros(39), atol=1e-4)
    assert torch.allclose(c[0].std(0), torch.ones(39), atol=1e-3)


# ---------------------------------------------------------------- pieces


def test_metrics():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance([], ["a", "b"]) == 2
    assert error_rate([["a", "b"], []], [["a", "c"], ["d", "e"]]) == pytest.approx(3 / 4)
    assert accuracy(["x", "y"], ["x", "x"]) == 0.5
    assert words(list("AB|C")) == ["AB", "C"]
    lp = torch.log(torch.tensor([[[0.1, 0.9, 0.0], [0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.1, 0.9, 0.0]]]))
    assert ctc_greedy_decode(lp) == [[1, 1]] and ctc_greedy_decode(lp, torch.tensor([2])) == [[1]]


def test_heads_and_featurizer():
    torch.manual_seed(0)
    fz = Featurizer(3)
    assert torch.allclose(fz.normalized_weights(), torch.full((3,), 1 / 3))
    frames, lengths = torch.randn(3, 2, 7, 5), torch.tensor([7, 4])
    frames[:, 1, 4:] = 0
    head = UtteranceHead(5, 4)
    # Projection, pooling and the layer sum are linear: the head on time means equals it on frames.
    means = torch.stack([frames[:, 0].mean(1), frames[:, 1, :4].mean(1)], 1)
    assert torch.allclose(head(fz(frames), lengths), head(fz(means)), atol=1e-5)
    ctc = CTCHead(5, 6, lstm=True, hidden=8)
    out = ctc(fz(frames), lengths)
    assert out.shape == (2, 7, 6) and torch.allclose(out.exp().sum(-1), torch.ones(2, 7))
    alone = ctc(fz(frames[:, 1:, :4]), lengths[1:])  # packing: padding never reaches a shorter clip
    assert torch.allclose(out[1, :4], alone[0], atol=1e-5)


# ---------------------------------------------------------------- feature cache


def test_feature_cache_reuse_miss_and_resume(tasks, tmp_path, monkeypatch):
    from speechmimic.tasks import load_task

    clips = load_task(tasks / "kw").split("train")[:12]
    up = CountingMFCC()
    first = FeatureStore(up, tmp_path).get(clips, progress=False)
    assert up.calls == 12 and first[0].frames is None and first[0].means[0].shape == (39,)

    again = FeatureStore(up, tmp_path)  # a new process: everything comes from disk
    second = again.get(clips, progress=False)
    assert up.calls == 12
    assert all(torch.equal(a.means[0], b.means[0]) for a, b in zip(first, second, strict=True))
    changed = dataclasses.replace(clips[0], duration=clips[0].duration - 0.1)
    assert again.get([changed], progress=False)[0].means[0].shape == (39,) and up.calls == 13
    # Frames are stored only when asked for; later requests for them read the new shard.
    with_frames = FeatureStore(up, tmp_path).get(clips[:3], frames=True, progress=False)
    assert up.calls == 16 and with_frames[0].frames[0].dtype == torch.float16
    FeatureStore(up, tmp_path).get(clips[:3], frames=True, progress=False)
    assert up.calls == 16

    # A crash keeps the finished shards: the rerun encodes only the clips after the last full shard.
    monkeypatch.setattr(features_mod, "SHARD_CLIPS", 5)
    crashing = CountingMFCC("mfcc-crash")
    real_forward = crashing.forward

    def forward(wavs):
        if crashing.calls == 11:
            raise RuntimeError("killed")
        return real_forward(wavs)

    crashing.forward = forward
    with pytest.raises(RuntimeError):
        FeatureStore(crashing, tmp_path).get(clips, progress=False)
    resumed = CountingMFCC("mfcc-crash")
    FeatureStore(resumed, tmp_path).get(clips, progress=False)
    assert resumed.calls == 2


def test_ranks_share_the_request_not_what_each_found_on_disk(tasks, tmp_path, monkeypatch):
    from speechmimic import distributed
    from speechmimic.tasks import load_task

    clips = load_task(tasks / "kw").split("train")[:4]
    # Rank 0 was quicker: its share of the request (clips 0 and 2) is on disk before rank 1 looks.
    FeatureStore(CountingMFCC(), tmp_path).get([clips[0], clips[2]], progress=False)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    up = CountingMFCC()
    got = FeatureStore(up, tmp_path).get(clips, progress=False)
    assert up.calls == 2  # clips 1 and 3, its own share, though it found half the request on disk
    assert all(f is not None for f in got)


def test_probe_reuses_cache(tasks, tmp_path):
    up = CountingMFCC()
    probe(up, tasks / "kw", cfg=ProbeConfig(max_epochs=2), cache_dir=tmp_path, progress=False)
    n = up.calls
    assert n == 480
    probe(up, tasks / "kw", cfg=ProbeConfig(seed=1, max_epochs=2), cache_dir=tmp_path, progress=False)
    assert up.calls == n


# ---------------------------------------------------------------- probes


@pytest.mark.parametrize("upstream", ["mfcc", RESEMBLYZER])
@pytest.mark.parametrize("task", ["kw", "spk"])
def test_probe_beats_majority(tasks, cache, ledger, upstream, task, tmp_path):
    result = probe(upstream, tasks / task, out_dir=tmp_path, cache_dir=cache, progress=False, ledger=ledger)
    assert result["metric"] == "accuracy" and result["head"] == "utterance"
    assert result["test"] > result["baselines"]["majority"] + 0.4, result
    assert json.loads((tmp_path / "result.json").read_text())["test"] == result["test"]
    assert sum(result["layer_weights"].values()) == pytest.approx(1.0)


def test_same_seed_same_result(tasks, cache, ledger):
    runs = [
        probe(
            RESEMBLYZER,
            tasks / "kw",
            cfg=ProbeConfig(seed=s, max_epochs=15),
            cache_dir=cache,
            progress=False,
            ledger=ledger,
        )
        for s in (3, 3, 4)
    ]
    assert runs[0] == runs[1]
    assert list(runs[0]["layer_weights"]) == ["lstm1", "lstm2", "lstm3"]
    assert runs[0]["layer_weights"] != runs[2]["layer_weights"]


def test_ctc_phones_beat_baselines(tasks, cache):
    result = probe("mfcc", tasks / "ph", cfg=ProbeConfig(max_epochs=30), cache_dir=cache, progress=False)
    assert result["metric"] == "per" and result["head"] == "linear-ctc"
    assert result["baselines"]["blank"] == 1.0
    assert result["test"] < 0.85 and result["test"] < result["baselines"]["unigram"] - 0.2, result


def test_chars_task_runs_with_bilstm(tasks, cache):
    cfg = ProbeConfig(max_epochs=1, lstm_hidden=16)
    result = probe("mfcc", tasks / "asr", cfg=cfg, cache_dir=cache, progress=False)
    assert result["metric"] == "wer" and result["head"] == "bilstm-ctc" and result["test"] >= 0.0
    assert set(result["baselines"]) == {"blank", "unigram"}


def test_cli(tasks, cache, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    probe_cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["probe", "--upstream", "mfcc", "--task", str(tasks / "spk"), "--out", str(tmp_path / "out")]
        + ["--cache", str(cache), "--epochs", "5", "--seed", "2", "--no-progress"]
    )
    assert args.func(args) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["seed"] == 2 and result["epochs"] <= 5 and (tmp_path / "out" / "probe.safetensors").exists()
    assert result["config"] == {**config.to_dict(ProbeConfig()), "seed": 2, "max_epochs": 5}
    assert "spk accuracy: test" in capsys.readouterr().out


# ---------------------------------------------------------------- speaker verification

LIBRISPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "librispeech_test_other_subset"


def test_verification_trials_are_checked(tmp_path):
    pool, _ = demo_corpus()
    clips = [c for c in pool if c.labels["kind"] == "sentence"][:12]
    splits = {"train": clips[:4], "dev": clips[4:8], "test": clips[8:]}
    task = write_task(tmp_path / "v", "v", "verify", "speaker", splits)
    trials = task.trials("test")  # every pair of the split, by default
    assert len(trials) == 6
    of = {c.id: c.labels["speaker"] for c in clips}
    assert all(t == (of[a] == of[b]) for t, a, b in trials)
    with pytest.raises(ValueError, match="trials name clips not in the split"):
        write_task(
            tmp_path / "w", "w", "verify", "speaker", splits, trials={"test": [(True, clips[0].id, "x")]}
        )
    with pytest.raises(ValueError, match="only a verify task has trials"):
        write_task(tmp_path / "c", "c", "classify", "speaker", splits, trials={"test": []})
    (tmp_path / "v" / "test_trials.txt").write_text("1 a b\nyes a b\n")
    with pytest.raises(ValueError, match=r"test_trials.txt:2: expected '<1\|0> <clip id> <clip id>'"):
        task.trials("test")


@pytest.mark.skipif(not LIBRISPEECH.is_dir(), reason=f"shared LibriSpeech subset not found at {LIBRISPEECH}")
def test_verification_probe_tells_a_speaker_encoder_from_mfcc(tmp_path, ledger, cache, capsys):
    _, asv = librispeech.build(LIBRISPEECH, tmp_path / "tasks", speaker_split=True, progress=False)
    results = {
        up: probe(
            up, asv, out_dir=tmp_path / up.split("?")[0], cache_dir=cache, ledger=ledger, progress=False
        )
        for up in ("mfcc", RESEMBLYZER)
    }
    target, mfcc = results[RESEMBLYZER], results["mfcc"]
    assert target["metric"] == "eer" and target["head"] == "cosine"
    # the state scored on test is the one with the lowest dev EER
    assert set(target["dev_by_state"]) == {"lstm1", "lstm2", "lstm3"}
    assert list(target["layer_weights"]) == [min(target["dev_by_state"], key=target["dev_by_state"].get)]
    # measured: resemblyzer 0.017, MFCC 0.21 (544 trials of 10 speakers' 3-s crops)
    assert target["test"] < 0.06 and mfcc["test"] > 0.12
    assert json.loads((tmp_path / "mfcc" / "result.json").read_text())["test"] == mfcc["test"]
    args = argparse.Namespace(
        upstream="mfcc", task=str(asv.root), out=None, seed=0, device="cpu", max_epochs=None, lr=None,
        batch_size=None, patience=None, cache=str(cache), no_progress=True, ledger=None,
    )  # fmt: skip
    probe_cli.run(args)
    assert "asv eer: test" in capsys.readouterr().out
