"""Linear probes on pooled features: what they score, and that grouped folds stop leaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from speechmimic.corpus import random_crops, scan
from speechmimic.probe.pooled import (
    ProbeSet,
    cv_accuracy,
    cv_by_state,
    pooled_features,
    split_accuracy,
    state_scores,
)
from speechmimic.upstream import load_upstream


def _blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


def test_separable_classes_score_high_and_shuffled_labels_score_chance():
    x, y = _blobs(30, 4, 16, 0.5, seed=0)
    assert cv_accuracy(x, y, seed=0) > 0.95
    shuffled = np.random.default_rng(1).permutation(y)
    assert cv_accuracy(x, shuffled, seed=0) < 0.45  # chance is 0.25


def test_groups_stop_a_probe_from_recognising_the_recording_instead_of_the_class():
    # Features say which recording a clip came from and nothing about its class; each recording
    # has one class. Folds that split recordings let the probe look the class up; grouped folds don't.
    rng = np.random.default_rng(0)
    recordings = 40
    rec_vec = rng.normal(size=(recordings, 32))
    rec_class = rng.permutation(np.arange(recordings) % 2)
    rec = np.repeat(np.arange(recordings), 6)
    x = rec_vec[rec] + 0.1 * rng.normal(size=(len(rec), 32))
    y = rec_class[rec]
    assert cv_accuracy(x, y, seed=0) > 0.9
    assert cv_accuracy(x, y, seed=0, groups=rec) < 0.75


def test_split_accuracy_and_per_state_scores():
    x, y = _blobs(20, 3, 8, 0.3, seed=2)
    assert split_accuracy(x[::2], y[::2], x[1::2], y[1::2]) > 0.95
    noise = np.random.default_rng(3).normal(size=x.shape)
    scores = cv_by_state({"signal": x, "noise": noise}, y)
    assert scores["signal"] > 0.95 > 0.6 > scores["noise"]


def test_pooled_features_are_time_mean_and_std_of_each_state(speech_clips):
    pool, _ = speech_clips
    clips = pool[:3]
    upstream = load_upstream("mfcc")
    feats = pooled_features(upstream, [c.load() for c in clips], progress=False)
    assert list(feats) == list(upstream.hidden_state_names)
    (x,) = feats.values()
    assert x.shape == (3, 2 * 39) and x.dtype == np.float32
    frames = upstream([torch.from_numpy(clips[1].load())])["hidden_states"][0][0]
    np.testing.assert_allclose(x[1, :39], frames.mean(0).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x[1, 39:], frames.std(0, unbiased=False).numpy(), rtol=1e-5, atol=1e-5)


def test_equal_error_rate_at_the_extremes_and_against_the_roc_curve():
    from sklearn.metrics import roc_curve

    from speechmimic.probe.metrics import equal_error_rate

    same = np.array([1] * 5 + [0] * 15, dtype=bool)
    assert equal_error_rate(np.where(same, 2.0, 1.0), same) == 0.0
    assert equal_error_rate(np.where(same, 1.0, 2.0), same) == 1.0
    rng = np.random.default_rng(0)
    target = rng.random(4000) < 0.2
    scores = rng.normal(size=4000) + 1.5 * target
    fpr, tpr, _ = roc_curve(target, scores)
    k = np.argmin(np.abs(fpr - (1 - tpr)))
    assert abs(equal_error_rate(scores, target) - (fpr[k] + 1 - tpr[k]) / 2) < 0.005
    assert abs(equal_error_rate(rng.normal(size=4000), target) - 0.5) < 0.05


def test_verification_sees_speakers_and_leaves_out_pairs_of_one_recording():
    from speechmimic.probe.pooled import verification_eer

    rng = np.random.default_rng(1)
    speaker = np.repeat(np.arange(8), 10)
    recording = np.repeat(np.arange(40), 2)  # 2 crops per recording, 5 recordings per speaker
    voice = rng.normal(size=(8, 16))[speaker]
    assert verification_eer(voice + 0.5 * rng.normal(size=voice.shape), speaker, recording) < 0.05
    # features that know the recording and nothing of the speaker: a trial of two crops of one
    # recording would be easy, and none is counted
    rec_only = rng.normal(size=(40, 16))[recording] + 0.1 * rng.normal(size=(80, 16))
    counted, fair = verification_eer(rec_only, speaker), verification_eer(rec_only, speaker, recording)
    assert counted < fair - 0.03 and abs(fair - 0.5) < 0.1


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_speaker_verification_separates_a_speaker_encoder_from_mfcc(tmp_path):
    """On real speech the probe must see what MFCC lacks (the issue asks for MFCC well below the
    target): resemblyzer, a speaker encoder, verifies LibriSpeech's 10 speakers from 3-s crops with
    an EER under half of MFCC's. (FSDD's half-second digits are no such probe: 0.20 against 0.24.)"""
    if not SHARED.is_dir():
        pytest.skip(f"real speech subsets are absent: {SHARED} (see shared/data/README.md)")
    libri = scan(SHARED / "librispeech_test_other_subset", progress=False).clips
    crops = random_crops(libri, 3.0, 2, seed=0)
    speakers, utterances = [c.labels["speaker"] for c in crops], [c.labels["utterance"] for c in crops]
    sets = {"sv": ProbeSet("sv", crops, speakers, utterances, task="verify")}
    target = state_scores(load_upstream("resemblyzer?layers=all", ledger=tmp_path / "ledger"), sets)["sv"]
    mfcc = state_scores(load_upstream("mfcc"), sets)["sv"]
    eer_target, eer_mfcc = 1 - max(target.values()), 1 - max(mfcc.values())
    assert eer_target < 0.5 * eer_mfcc and eer_mfcc > 0.1, (target, mfcc)
