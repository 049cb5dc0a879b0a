import subprocess
import sys

import numpy as np
import pytest
import torch

from speechmimic.targets import Target, load_backend, parse_spec
from speechmimic.targets.registry import _KINDS, FORMS
from speechmimic.testing import tiny_hf_model

HIDDEN = 32
# Tiny conv stack: kernels (10, 3), strides (5, 2) -> 1600 Hz frames, receptive field 20 samples.
CONV = ((10, 5), (3, 2))


def _frames(n: int) -> int:
    return ((n - 10) // 5 + 1 - 3) // 2 + 1


def _wavs(*lengths: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        # HuBERT base style: group-norm CNN, raw input, no attention mask.
        "hubert": tiny_hf_model(root / "hubert", "hubert", HIDDEN, conv=CONV, feat_extract_norm="group"),
        # Large style: layer-norm CNN, normalised input, attention mask when padded.
        "wavlm": tiny_hf_model(root / "wavlm", "wavlm", HIDDEN, conv=CONV, feat_extract_norm="layer"),
    }


def _reference(directory, wav: np.ndarray, normalize: bool) -> list[np.ndarray]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(directory, local_files_only=True).eval()
    if normalize:
        wav = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)
    with torch.inference_mode():
        out = model(torch.from_numpy(wav)[None], output_hidden_states=True)
    n = int(model._get_feat_extract_output_lengths(len(wav)))
    assert n == _frames(len(wav))
    return [h[0].numpy() for h in out.hidden_states]


@pytest.mark.parametrize("name,normalize", [("hubert", False), ("wavlm", True)])
def test_hf_all_layers_match_model(tiny_models, name, normalize):
    target = load_backend(f"hf:{tiny_models[name]}?layers=all")
    assert isinstance(target, Target)
    assert target.layers == ["hidden_0", "hidden_1", "hidden_2"]
    assert target.frame_rate == 1600.0
    assert target.min_samples == 20
    assert target.padding == "per_clip"
    assert target.normalize is normalize
    wavs = _wavs(1000, 1733, 20)
    outputs = target(wavs)
    for wav, out in zip(wavs, outputs, strict=True):
        reference = _reference(tiny_models[name], wav, normalize)
        assert list(out) == target.layers
        for i, layer in enumerate(target.layers):
            assert out[layer].shape == (_frames(len(wav)), HIDDEN)
            assert out[layer].dtype == np.float32
            np.testing.assert_allclose(out[layer], reference[i], atol=1e-5)


def test_hf_default_is_last_layer_and_spec_rebuilds(tiny_models):
    target = load_backend(f"hf:{tiny_models['hubert']}")
    assert target.layers == ["hidden_2"]
    assert target.spec == f"hf:{tiny_models['hubert']}?layers=2&padding=per_clip"
    (out,) = target(_wavs(800))
    assert list(out) == ["hidden_2"]
    picked = load_backend(f"hf:{tiny_models['hubert']}?layers=-1,0,2")
    assert picked.layers == ["hidden_2", "hidden_0"]
    rebuilt = load_backend(picked.spec)
    assert rebuilt.layers == picked.layers
    np.testing.assert_array_equal(rebuilt(_wavs(800))[0]["hidden_2"], out["hidden_2"])


@pytest.mark.parametrize("name", ["hubert", "wavlm"])
def test_hf_bucket_trims_each_clip(tiny_models, name):
    spec = f"hf:{tiny_models[name]}?layers=all&padding=bucket&batch_seconds=1"
    bucket = load_backend(spec)
    assert bucket.padding == "bucket"
    assert bucket.spec.endswith("padding=bucket&batch_seconds=1")
    lengths = (1650, 4000, 1600, 1680, 1700)
    assert bucket._buckets(list(lengths)) == [[2, 0, 3], [4], [1]]
    wavs = _wavs(*lengths)
    exact = load_backend(f"hf:{tiny_models[name]}?layers=all")(wavs)
    for wav, out, ref in zip(wavs, bucket(wavs), exact, strict=True):
        for layer in bucket.layers:
            assert out[layer].shape == (_frames(len(wav)), HIDDEN)
        if name == "wavlm":
            # With an attention mask the padded frames are masked out: same result up to float noise.
            np.testing.assert_allclose(out["hidden_2"], ref["hidden_2"], atol=1e-4)
    # Group norm over the padded length shifts every frame of the shorter clips: why it is recorded.
    if name == "hubert":
        out = bucket(wavs)
        assert not np.allclose(out[0]["hidden_0"], exact[0]["hidden_0"], atol=1e-4)


def test_hf_too_short_clip_raises(tiny_models):
    target = load_backend(f"hf:{tiny_models['hubert']}")
    with pytest.raises(ValueError, match="19 samples"):
        target(_wavs(800, 19))


def test_hf_preprocessor_config_decides_normalisation(tiny_models, tmp_path):
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    AutoModel.from_pretrained(tiny_models["wavlm"], local_files_only=True).save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(tmp_path)
    assert load_backend(f"hf:{tmp_path}").normalize is False


@pytest.mark.parametrize("location", ["/missing/dir", "./missing", "models/x/y"])
def test_a_missing_local_folder_is_not_taken_for_a_hub_id(tmp_path, location):
    # transformers alone answers "Repo id must be in the form 'repo_name' or 'namespace/repo_name'".
    with pytest.raises(ValueError) as e:
        load_backend(f"hf:{location}?layers=all")
    assert str(e.value) == (
        f"'hf:{location}?layers=all': '{location}' is no such directory, and not a hub id ('name' or "
        "'namespace/name'); a target spec is one of hf:<local dir or hub id>, "
        "whisper:<tiny.en, base, a folder or a hub id>, resemblyzer, http://host:port, https://host:port, "
        "each with ?key=value&... options"
    )
    assert set(FORMS) == set(_KINDS)  # every kind is listed


def test_parse_spec():
    assert parse_spec("hf:microsoft/wavlm-base-plus?layers=1,-1&padding=bucket") == (
        "hf",
        "microsoft/wavlm-base-plus",
        {"layers": "1,-1", "padding": "bucket"},
    )
    assert parse_spec("resemblyzer") == ("resemblyzer", "", {})
    assert parse_spec("resemblyzer?layers=all") == ("resemblyzer", "", {"layers": "all"})


@pytest.mark.parametrize(
    "spec,match",
    [
        ("wav2vec:x", "valid kinds"),
        ("whisper:x", "not a packaged model"),
        ("hf:", "needs a location"),
        ("hf:x?bogus=1", "valid options"),
        ("hf:x?layers", "malformed"),
        ("hf:x?layers=1&layers=2", "twice"),
        ("resemblyzer:x", "takes no location"),
        ("resemblyzer?batch_seconds=3", "valid options"),
        ("resemblyzer?padding=bucket", "per_clip"),
        ("resemblyzer?layers=0", "out of range"),
        ("resemblyzer?layers=first", "comma list"),
    ],
)
def test_bad_specs_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        load_backend(spec)


@pytest.mark.parametrize(
    "options,match",
    [("padding=weird", "valid"), ("layers=3", "out of range"), ("batch_seconds=-1", "positive")],
)
def test_bad_hf_options_raise(tiny_models, options, match):
    with pytest.raises(ValueError, match=match):
        load_backend(f"hf:{tiny_models['hubert']}?{options}")


# --- resemblyzer ---


@pytest.fixture(scope="module")
def resemblyzer_target():
    return load_backend("resemblyzer?layers=all")


def _speechlike(n: int, amplitude: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    wav = np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.3 * rng.standard_normal(n)
    return (amplitude * wav / np.abs(wav).max()).astype(np.float32)


def test_resemblyzer_preprocessing_matches_resemblyzer(resemblyzer_target):
    from resemblyzer.audio import normalize_volume, wav_to_mel_spectrogram

    from speechmimic.targets.resemblyzer import normalize_volume as ours

    for amplitude in (0.001, 0.9):  # quiet clips are raised to -30 dBFS, loud ones left alone
        wav = _speechlike(12345, amplitude)
        np.testing.assert_array_equal(ours(wav), normalize_volume(wav, -30, increase_only=True))
        wav = ours(wav)
        mel = resemblyzer_target.mel(torch.from_numpy(wav)[None])[0].numpy()
        expected = wav_to_mel_spectrogram(wav)
        assert mel.shape == expected.shape == (12345 // 160 + 1, 40)
        np.testing.assert_allclose(mel, expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_resemblyzer_last_layer_matches_three_layer_lstm(resemblyzer_target):
    from resemblyzer.audio import normalize_volume, wav_to_mel_spectrogram

    from speechmimic.targets.resemblyzer import weights_path

    state = torch.load(weights_path(), map_location="cpu", weights_only=True)["model_state"]
    lstm = torch.nn.LSTM(40, 256, 3, batch_first=True)
    lstm.load_state_dict({k[len("lstm.") :]: v for k, v in state.items() if k.startswith("lstm.")})
    wavs = [_speechlike(16000, 0.01, seed=1), _speechlike(8000, 0.5, seed=2), _speechlike(8000, 0.2, seed=3)]
    outputs = resemblyzer_target(wavs)
    for wav, out in zip(wavs, outputs, strict=True):
        mel = wav_to_mel_spectrogram(normalize_volume(wav, -30, increase_only=True))
        with torch.inference_mode():
            expected, _ = lstm(torch.from_numpy(mel)[None])
        np.testing.assert_allclose(out["lstm3"], expected[0].numpy(), atol=1e-4)


def test_resemblyzer_layers(resemblyzer_target):
    assert resemblyzer_target.layers == ["lstm1", "lstm2", "lstm3"]
    assert resemblyzer_target.frame_rate == 100.0
    assert resemblyzer_target.min_samples == 400
    assert resemblyzer_target.padding == "per_clip"
    assert isinstance(resemblyzer_target, Target)
    for n, out in zip((400, 4321), resemblyzer_target(_wavs(400, 4321)), strict=True):
        assert list(out) == ["lstm1", "lstm2", "lstm3"]
        for frames in out.values():
            assert frames.shape == (n // 160 + 1, 256) and frames.dtype == np.float32
    default = load_backend("resemblyzer")
    assert default.layers == ["lstm3"] and default.spec == "resemblyzer?layers=3"
    assert load_backend("resemblyzer?layers=-1,1").layers == ["lstm3", "lstm1"]
    with pytest.raises(ValueError, match="399 samples"):
        default(_wavs(399))
    # Silence stays finite (resemblyzer's own normalisation would turn it into NaN).
    assert np.isfinite(default([np.zeros(1600, np.float32)])[0]["lstm3"]).all()


def test_targets_import_is_light():
    code = (
        "import sys, speechmimic.targets, speechmimic.targets.resemblyzer, speechmimic.targets.hf;"
        "print(sorted(m for m in ('librosa', 'resemblyzer', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
