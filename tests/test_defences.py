"""Defences wrapping a target: each does what it says to the answers, keeps per-key state across a
restart, and composes in the spec a ledger records."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from speechmimic.corpus import Clip
from speechmimic.defences import Chain, Defended, Query, Refused, digest, load_target, parse_chain
from speechmimic.defences.b4b import B4B
from speechmimic.defences.perturb import Layers, Noise, Round
from speechmimic.defences.prada import Prada
from speechmimic.defences.quota import Quota
from speechmimic.defences.transform import Transform
from speechmimic.ledger import Ledger, query_clips
from speechmimic.targets.base import PartialAnswers

SR = 16_000
HOP = 160


class ProjectionTarget:
    """Frames of 10 ms projected on fixed random directions: an answer is a function of the audio."""

    spec = "fake:projection"
    frame_rate = 100.0
    layers = ["a", "b"]
    padding = "per_clip"
    min_samples = HOP

    def __init__(self, dim: int = 8):
        rng = np.random.default_rng(0)
        self.w = {k: rng.standard_normal((HOP, dim)).astype(np.float32) for k in self.layers}
        self.calls = 0

    def __call__(self, wavs, keys=None):
        self.calls += 1
        out = []
        for w in wavs:
            frames = w[: len(w) // HOP * HOP].reshape(-1, HOP)
            out.append({k: np.tanh(frames @ m) for k, m in self.w.items()})
        return out


def clips_like(n: int, seed: int, spread: float = 1.0, centre: np.ndarray | None = None) -> list[np.ndarray]:
    """``n`` half-second clips; ``spread`` scales how different they are around ``centre``."""
    rng = np.random.default_rng(seed)
    base = centre if centre is not None else np.zeros(SR // 2, np.float32)
    return [(base + spread * 0.1 * rng.standard_normal(SR // 2)).astype(np.float32) for _ in range(n)]


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    return 10 * np.log10(np.mean(clean**2) / np.mean((noisy - clean) ** 2))


def test_noise_has_the_stated_snr_and_repeats_exactly():
    target = ProjectionTarget()
    wavs = clips_like(4, 0)
    clean = target(wavs)
    alice = Defended(target, [Noise(snr="10", seed="1")], account="alice")
    noisy = alice(wavs)
    snrs = [snr_db(c[k], n[k]) for c, n in zip(clean, noisy, strict=True) for k in target.layers]
    assert np.mean(snrs) == pytest.approx(10, abs=0.3)
    again = alice(wavs)
    assert all(np.array_equal(a["a"], b["a"]) for a, b in zip(noisy, again, strict=True))
    bob = Defended(target, [Noise(snr="10", seed="1")], account="bob")(wavs)
    assert not np.allclose(bob[0]["a"], noisy[0]["a"])  # noise differs per key: no two keys agree


def test_round_and_layers():
    target = ProjectionTarget()
    wav = clips_like(1, 1)
    d = Defended(target, [Round(step="0.25"), Layers(keep="b")])
    (answer,) = d(wav)
    assert list(answer) == ["b"] and d.layers == ["b"]
    assert np.allclose(answer["b"] / 0.25, np.round(answer["b"] / 0.25), atol=1e-5)
    assert np.abs(answer["b"] - target(wav)[0]["b"]).max() <= 0.125 + 1e-6
    with pytest.raises(ValueError, match="not among the target's layers"):
        Defended(target, [Layers(keep="c")])


def test_rotation_keeps_each_keys_geometry_and_breaks_pooling_until_mapped():
    target = ProjectionTarget()
    wavs = clips_like(6, 2)
    clean = np.vstack([a["a"] for a in target(wavs)])
    alice = np.vstack([a["a"] for a in Defended(target, [Transform(seed="5")], "alice")(wavs)])
    bob = np.vstack([a["a"] for a in Defended(target, [Transform(seed="5")], "bob")(wavs)])
    gram = clean @ clean.T
    assert np.allclose(alice @ alice.T, gram, atol=1e-3) and np.allclose(bob @ bob.T, gram, atol=1e-3)
    assert np.abs(alice - bob).mean() > 0.1 * np.abs(clean).mean()  # two keys' answers do not pool...
    m, *_ = np.linalg.lstsq(bob, alice, rcond=None)  # ...until a map is fitted on shared clips
    assert np.allclose(bob @ m, alice, atol=1e-3)
    shuffled = Defended(target, [Transform(kind="shuffle", pad="4")], "alice")(wavs[:1])[0]["a"]
    assert shuffled.shape == (clean.shape[0] // 6, 12)


def test_b4b_noise_grows_with_coverage_and_state_survives_a_restart(tmp_path):
    target = ProjectionTarget()
    options = {"planes": "4", "sets": "8", "lambda": "0.001", "alpha": "1", "beta": "0.5"}
    b4b = B4B(**options)
    assert b4b.sigma(0) == 0 and b4b.sigma(0.25) < b4b.sigma(0.5) == pytest.approx(0.999, abs=1e-6)
    centre = np.random.default_rng(9).standard_normal(SR // 2).astype(np.float32) * 0.1
    narrow = clips_like(40, 3, spread=0.05, centre=centre)  # an app asking about one thing
    wide = clips_like(40, 4, spread=3.0)  # a thief sweeping the space
    state = tmp_path / "state.sqlite"
    honest = Defended(target, [B4B(**options)], "honest", state)
    thief = Defended(target, [B4B(**options)], "thief", state)
    honest(narrow), thief(wide)
    cov = {k: honest.chain.status(k)["0.b4b"]["coverage"] for k in ("honest", "thief")}
    assert cov["thief"] > 2 * cov["honest"]
    # the thief's last answers are noisier than the honest key's
    clean = target(wide[-5:] + narrow[-5:])
    got = thief(wide[-5:]) + honest(narrow[-5:])
    thief_snr = np.mean([snr_db(c["a"], g["a"]) for c, g in zip(clean[:5], got[:5], strict=True)])
    honest_snr = np.mean([snr_db(c["a"], g["a"]) for c, g in zip(clean[5:], got[5:], strict=True)])
    assert thief_snr < honest_snr - 10
    # a restarted server reads the coverage back, and a repeated clip gets the same noisy answer
    restarted = Defended(target, [B4B(**options)], "thief", state)
    assert restarted.chain.status("thief")["0.b4b"]["coverage"] == cov["thief"]
    assert np.array_equal(restarted(wide[-1:])[0]["a"], got[4]["a"])


def test_prada_flags_a_sweep_and_not_natural_traffic_then_refuses(tmp_path):
    target = ProjectionTarget()
    # natural traffic: clips scattered at random; the sweep: clips on an evenly spaced lattice of
    # a few directions, whose nearest-neighbour distances pile onto one value
    natural = clips_like(60, 5)
    rng = np.random.default_rng(6)
    basis = [rng.standard_normal(SR // 2).astype(np.float32) * 0.1 for _ in range(3)]
    sweep = [(i * basis[0] + j * basis[1] + k * basis[2]).astype(np.float32) / 3
             for i in range(1, 5) for j in range(1, 5) for k in range(1, 5)]  # fmt: skip
    state = tmp_path / "prada.sqlite"
    prada = {"threshold": "0.9", "min_queries": "20", "action": "refuse"}
    honest = Defended(target, [Prada(**prada)], "honest", state)
    honest(natural)
    status = honest.chain.status("honest")["0.prada"]
    assert not status["alarm"] and status["w_min"] > 0.9
    thief = Defended(target, [Prada(**prada)], "thief", state)
    answered = 0
    for wav in sweep:
        try:
            thief([wav])
            answered += 1
        except PartialAnswers as e:
            assert isinstance(e.errors[0], Refused)
    status = thief.chain.status("thief")["0.prada"]
    assert status["alarm"] and answered == status["alarm_after_queries"] < len(sweep)
    # the alarm survives a restart: the thief stays refused, the honest key is still answered
    again = Defended(target, [Prada(**prada)], "thief", state)
    with pytest.raises(PartialAnswers):
        again(clips_like(1, 7))
    Defended(target, [Prada(**prada)], "honest", state)(clips_like(1, 8))


def test_quota_through_the_ledger_pays_up_to_it_and_records_the_refusals(tmp_path):
    target = ProjectionTarget()
    rng = np.random.default_rng(0)
    real = []
    for i in range(6):
        wav = tmp_path / f"c{i}.wav"
        sf.write(wav, (0.1 * rng.standard_normal(SR)).astype(np.float32), SR, subtype="FLOAT")
        real.append(Clip(id=f"c{i}", path=str(wav), sampling_rate=SR, num_samples=SR, duration=1.0))
    defended = Defended(target, [Quota(seconds="3.5")], "thief", tmp_path / "q.sqlite")
    ledger = Ledger(tmp_path / "ledger")
    stats = query_clips(defended, real, ledger, batch_size=4, progress=False)
    assert stats["paid"] == 3 and len(ledger) == 3
    assert "|quota?seconds=3.5|account?name=thief" in ledger.header["target"]
    # a clip already answered is free again, under the quota
    (answer,) = defended([real[0].load()])
    assert np.array_equal(answer["a"], target([real[0].load()])[0]["a"])


def test_specs_rebuild_and_refuse_mistakes(tmp_path):
    base, defences, account, state = parse_chain("resemblyzer|noise?snr=5|account?name=a&state=s.db")
    assert base == "resemblyzer" and [d.kind for d in defences] == ["noise"] and account == "a"
    with pytest.raises(ValueError, match="unknown defence 'nois'"):
        parse_chain("resemblyzer|nois?snr=5")
    with pytest.raises(ValueError, match="option snr must be a float"):
        parse_chain("resemblyzer|noise?snr=loud")
    with pytest.raises(ValueError, match="unknown option 'bits'"):
        parse_chain("resemblyzer|round?bits=4")
    with pytest.raises(ValueError, match="comes last"):
        parse_chain("resemblyzer|account?name=a|noise")
    with pytest.raises(ValueError, match="unknown target kind"):
        parse_chain("resemblizer|noise")
    t = load_target(f"resemblyzer?layers=all|round?step=0.5|account?name=z&state={tmp_path / 's.db'}")
    assert load_target(t.spec).spec == t.spec
    q = Query("z", np.zeros(SR, np.float32), digest(np.zeros(SR, np.float32)))
    Chain([Quota(seconds="0.5")]).admit(Query("z", q.wav[:4000], digest(q.wav[:4000])))
    with pytest.raises(Refused):
        Chain([Quota(seconds="0.5")]).admit(q)
