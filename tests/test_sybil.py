"""Several API keys as one target: answers mapped into the first key's coordinates, anchors paid once."""

from __future__ import annotations

import numpy as np
import pytest

from speechmimic.defences import Defended, Refused
from speechmimic.defences.quota import Quota
from speechmimic.defences.transform import Transform
from speechmimic.sybil import Sybils
from speechmimic.targets.base import PartialAnswers
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


def test_a_key_that_refuses_passes_its_clips_to_the_others_until_all_refuse():
    target = ProjectionTarget()
    # half-second clips; the anchors cost each key 1 s, then key 1 has room for one clip only
    keys = [Defended(target, [Quota(seconds=q)], f"k{j}") for j, q in enumerate(("4.0", "1.5"))]
    sybils = Sybils(keys, anchors=2)
    got = sybils(clips_like(8, 13))  # 2 anchors + 6 clips in turn; key 1's later turns go to key 0
    assert all(g is not None for g in got)
    used = [k.chain.status(k.account)["0.quota"]["seconds"] for k in keys]
    assert used == [3.5, 1.5]
    with pytest.raises(PartialAnswers) as e:
        sybils(clips_like(3, 14))  # key 0 takes one more; then both are spent
    assert e.value.answers[0] is not None and e.value.answers[1:] == [None, None]
    assert all(isinstance(x, Refused) for x in e.value.errors.values())
