"""The answer watermark on the real resemblyzer: the served API nudges only frames that carry the
secret band; a copy fitted to the marked API's answers carries the mark while the unmarked original
and a copy fitted to it do not (the exclusive verdict); the p-value is exact under the null; the
commands and the defence spec work end to end, with one-line errors for bad input."""

from __future__ import annotations

import json

import librosa
import numpy as np
import pytest
import torch
from scipy.stats import kstest
from sklearn.linear_model import Ridge
from torch import nn

from speechmimic.cli import main
from speechmimic.corpus import write_manifest
from speechmimic.defences import load_target
from speechmimic.defences.mark import MarkConfig, MarkSecret, band_score, frame_weights, make_secret, trigger
from speechmimic.errors import InputError
from speechmimic.ledger import Ledger
from speechmimic.proof.answer_mark import p_value, verify
from speechmimic.recipes.demo import demo_corpus
from speechmimic.upstream import load_upstream

pytest.importorskip("resemblyzer")
TARGET = "resemblyzer?layers=all"


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    root = tmp_path_factory.mktemp("mark")
    pool, heldout = demo_corpus()
    private = [c.load() for c in heldout[:48]]
    secret = make_secret(load_target(TARGET), private, MarkConfig(seed=3))
    path = secret.save(root / "secret.npz")
    return root, path, [c.load() for c in pool]


class LinearCopy(nn.Module):
    """A thief's copy in its simplest form: ridge regressions from log-mel frames (with two frames of
    context each side) to each answered layer, fitted on what an API answered."""

    def __init__(self, answers: list[dict], wavs: list[np.ndarray], layers: list[str]):
        super().__init__()
        self.hidden_state_names = layers
        x, y = [], {k: [] for k in layers}
        for a, w in zip(answers, wavs, strict=True):
            f = self.features(w)
            n = min(len(f), *(len(a[k]) for k in layers))
            x.append(f[:n])
            for k in layers:
                y[k].append(a[k][:n])
        x = np.concatenate(x)
        self.maps = {k: Ridge(alpha=1.0).fit(x, np.concatenate(y[k])) for k in layers}

    @staticmethod
    def features(wav: np.ndarray) -> np.ndarray:
        mel = librosa.feature.melspectrogram(y=wav, sr=16000, n_fft=400, hop_length=160, n_mels=40)
        logmel = np.log(mel + 1e-6).T
        padded = np.pad(logmel, ((2, 2), (0, 0)), mode="edge")
        return np.concatenate([padded[i : i + len(logmel)] for i in range(5)], axis=1)

    @torch.no_grad()
    def forward(self, wavs):
        f = self.features(wavs[0].numpy())
        return {"hidden_states": [torch.from_numpy(self.maps[k].predict(f)[None]).float() for k in self.maps]}


def test_the_served_mark_moves_only_frames_carrying_the_band(owner):
    root, path, pool = owner
    secret = MarkSecret.load(path)
    plain, served = load_target(TARGET), load_target(f"{TARGET}|mark?secret={path}")
    wav = pool[0]
    a, b = plain([wav])[0], served([wav])[0]
    w = frame_weights(wav, len(a["lstm1"]), secret)
    for layer in secret.layers:
        moved = np.abs(b[layer] - a[layer]).max(1) > 1e-6
        assert np.array_equal(moved, w > 0), layer
    # the trigger puts the band into (nearly) every frame; speech alone into few
    assert (frame_weights(trigger(wav, secret, 0), 100, secret) > 0.5).mean() > 0.8
    assert (w > 0).mean() < 0.5
    # asking twice gets the same answer
    again = served([wav])[0]
    assert all(np.array_equal(again[k], b[k]) for k in secret.layers)


def test_the_verdict_is_exclusive_to_the_marked_api_and_its_copies(owner):
    root, path, pool = owner
    secret = MarkSecret.load(path)
    plain, served = load_target(TARGET), load_target(f"{TARGET}|mark?secret={path}")
    thief, check = pool[:120], pool[-24:]
    layers = secret.layers
    copies = {
        "marked": LinearCopy(served(thief), thief, layers),
        "original": LinearCopy(plain(thief), thief, layers),
    }
    found = {name: verify(c, secret, check) for name, c in copies.items()}
    for name, spec in (("marked API", f"{TARGET}|mark?secret={path}"), ("unmarked original", TARGET)):
        found[name] = verify(load_upstream(spec, ledger=Ledger(root / name)), secret, check)
    assert found["marked API"]["verdict"] == "watermark found" and found["marked API"]["p_value"] < 1e-10
    assert found["marked"]["verdict"] == "watermark found" and found["marked"]["p_value"] < 1e-4
    for null in ("unmarked original", "original"):
        assert found[null]["verdict"] == "no watermark" and found[null]["p_value"] > 0.01, found[null]
    # subtracting the original's own reaction leaves the copy's lean toward the key
    ref = load_upstream(TARGET, ledger=Ledger(root / "unmarked original"))
    assert verify(copies["marked"], secret, check, reference=ref)["p_value"] < 1e-4


def test_the_p_value_is_exact_under_the_null():
    rng = np.random.default_rng(0)
    # reactions with a strong shared direction, as real models' reactions to one sound have
    d = rng.standard_normal((32, 64)) + 3 * rng.standard_normal(64)
    ps = []
    for _ in range(400):
        key = rng.standard_normal(64)
        ps.append(p_value(d, key / np.linalg.norm(key))[2])
    assert kstest(ps, "uniform").pvalue > 0.01
    shared = d.mean(0) / np.linalg.norm(d.mean(0))
    assert p_value(d, shared)[2] < 1e-12  # the reaction's own direction is no random key


def test_band_score_of_silence_is_zero_and_of_band_noise_high(owner):
    _, path, pool = owner
    secret = MarkSecret.load(path)
    assert np.allclose(band_score(np.zeros(16000, np.float32), secret.band), 0)
    speech = pool[1]
    assert (
        band_score(trigger(speech, secret, 1), secret.band).mean()
        > band_score(speech, secret.band).mean() + 1
    )


def test_the_commands_mark_and_verify_and_their_errors(owner, tmp_path, capsys):
    _, _, _ = owner
    pool, heldout = demo_corpus()
    write_manifest(heldout[:24], tmp_path / "mine.jsonl")
    write_manifest(pool[:16], tmp_path / "check.jsonl")
    secret = tmp_path / "owner" / "secret.npz"
    cmd = ["watermark", "mark", "--target", TARGET, "--manifest", str(tmp_path / "mine.jsonl")]
    assert main([*cmd, "--secret", str(secret), "--strength", "1.5", "--seed", "4"]) == 0
    served = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("serve the marked API as: ")
    assert served == f"{TARGET}|mark?secret={secret}" and MarkSecret.load(secret).strength == 1.5
    verify_cmd = ["watermark", "verify", "--secret", str(secret), "--manifest", str(tmp_path / "check.jsonl")]
    out = tmp_path / "v.json"
    assert main([*verify_cmd, "--suspect", served, "--ledger", str(tmp_path / "l"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (
        result["kind"] == "answer mark" and result["verdict"] == "watermark found" and result["clips"] == 16
    )

    assert main([*cmd, "--secret", str(tmp_path / "s.npz"), "--low", "0.99", "--high", "0.5"]) == 2
    assert "need 0 < low < high < 1" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"not a secret")
    assert (
        main([*verify_cmd[:2], "--secret", str(tmp_path / "junk.npz"), *verify_cmd[4:], "--suspect", served])
        == 2
    )
    assert "not a watermark secret" in capsys.readouterr().err
    with pytest.raises(InputError, match="needs secret=FILE"):
        load_target(f"{TARGET}|mark")
    with pytest.raises(InputError, match="marks .* not answered here"):
        load_target(f"resemblyzer?layers=1|mark?secret={secret}")


def test_the_audit_tests_each_copy_for_the_answer_mark_and_prices_it(owner, tmp_path):
    from speechmimic.audit.grid import Audit, AuditConfig
    from speechmimic.audit.report import summarise, write
    from speechmimic.audit.suites import demo_suite

    _, path, _ = owner
    suite = demo_suite()
    suite.probes = {"keywords": suite.probes["keywords"]}
    suite.benign = {}
    served = f"{TARGET}|mark?secret={path}"
    cfg = AuditConfig(
        target=served, budgets=["25%"], defences={"none": ""}, steps=5, streams=0, secret=str(path)
    )
    report = summarise(Audit(load_target(served), suite, tmp_path, cfg, progress=False).run(), cfg)
    proof = report["rows"][0]["proof"]
    assert proof["watermark"] in ("watermark found", "no watermark") and 0 <= proof["watermark_p"] <= 1
    assert isinstance(proof["watermark_stat"], float)  # the answer mark's z
    cost = report["watermark_cost"]["keywords"]
    assert abs(cost["cost_points"]) <= 100 and cost["original"] > 0
    text = write(report, tmp_path, "audit with the answer mark")["md"].read_text()
    assert "## Proof of theft" in text and "Copies found: " in text
