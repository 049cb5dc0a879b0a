"""Linear probes on pooled features: what they score, and that grouped folds stop leaks."""

from __future__ import annotations

import numpy as np
import torch

from speechmimic.probe.pooled import cv_accuracy, cv_by_state, pooled_features, split_accuracy
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
