"""Several API keys as one target: answers mapped into the first key's coordinates, anchors paid once."""

from __future__ import annotations

import numpy as np

from speechmimic.defences import Defended
from speechmimic.defences.transform import Transform
from speechmimic.sybil import Sybils
from test_defences import SR, ProjectionTarget, clips_like


def test_sybils_pool_rotated_keys_into_one_space_and_resume_without_paying_anchors_again(tmp_path):
    target = ProjectionTarget()
    keys = [Defended(target, [Transform(seed="9")], f"sybil{j}") for j in range(3)]
    store = tmp_path / "anchors.npz"
    sybils = Sybils(keys, anchors=4, store=store)
    wavs = clips_like(10, 11)
    got = sybils(wavs)
    own = keys[0](wavs)  # what the first key alone would have been answered
    for g, o in zip(got, own, strict=True):
        for layer in target.layers:
            assert np.allclose(g[layer], o[layer], atol=1e-3)
    assert sybils.extra_seconds == 4 * 2 * (SR // 2) / SR  # the anchors, through the two other keys
    # the six later clips went to the keys in turn: each key was asked for two of them
    before = target.calls
    resumed = Sybils(keys, anchors=4, store=store)
    again = resumed(clips_like(3, 12))
    assert target.calls - before == 3  # maps refitted from the stored anchors: nothing asked twice
    for g, o in zip(again, keys[0](clips_like(3, 12)), strict=True):
        assert np.allclose(g["a"], o["a"], atol=1e-3)
