import numpy as np
import pytest
import soundfile as sf

from speechmimic.audio import (
    SAMPLE_RATE,
    AudioError,
    EmptyAudioError,
    NonFiniteAudioError,
    SilentAudioError,
    TooShortAudioError,
    UnreadableAudioError,
    UnsupportedAudioTypeError,
    audio_info,
    load_audio,
    resample,
    validate_waveform,
)


def tone(seconds=1.0, sr=16000, freq=440.0, channels=1):
    t = np.arange(round(seconds * sr)) / sr
    wav = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wav] * channels, axis=1) if channels > 1 else wav


def write(path, wav, sr=16000, **kw):
    sf.write(path, wav, sr, **kw)
    return path


def test_error_carries_path_and_reason():
    e = NonFiniteAudioError("bad.wav", "contains NaN/Inf samples")
    assert isinstance(e, AudioError) and isinstance(e, ValueError)
    assert (e.path, e.reason) == ("bad.wav", "contains NaN/Inf samples")
    assert str(e) == "bad.wav: contains NaN/Inf samples"


@pytest.mark.parametrize("ext,fmt", [("wav", "WAV"), ("flac", "FLAC"), ("ogg", "OGG")])
def test_load_formats(tmp_path, ext, fmt):
    path = write(tmp_path / f"a.{ext}", tone(0.5), format=fmt)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1 and len(wav) == 8000
    assert audio_info(path) == (16000, 8000, 1)


def test_stereo_is_mixed_to_mono_by_mean(tmp_path):
    left, right = tone(0.25, freq=300), tone(0.25, freq=500)
    path = write(tmp_path / "st.wav", np.stack([left, right], axis=1), subtype="FLOAT")
    wav = load_audio(path)
    assert wav.ndim == 1
    np.testing.assert_allclose(wav, (left + right) / 2, atol=1e-6)
    assert audio_info(path)[2] == 2


@pytest.mark.parametrize("sr", [8000, 44100])
def test_resampled_to_16k_with_right_length(tmp_path, sr):
    path = write(tmp_path / f"r{sr}.wav", tone(1.5, sr=sr), sr)
    wav = load_audio(path)
    assert len(wav) == 24000
    # The tone survives resampling: its spectral peak stays at 440 Hz.
    spectrum = np.abs(np.fft.rfft(wav))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(wav) - 440) < 2


def test_resample_noop_and_length():
    x = tone(1.0, sr=8000)
    np.testing.assert_array_equal(resample(x, 8000, 8000), x)
    assert len(resample(x, 8000, 16000)) == 16000


def test_offset_and_duration_read_only_requested_frames(tmp_path):
    ramp = (np.arange(16000, dtype=np.float32) / 16000) * 0.5 + 0.1
    path = write(tmp_path / "ramp.wav", ramp, subtype="FLOAT")
    wav = load_audio(path, offset=0.25, duration=0.5)
    np.testing.assert_array_equal(wav, ramp[4000:12000])
    assert len(load_audio(path, offset=0.75)) == 4000
    # Duration past the end is clipped to what the file holds.
    assert len(load_audio(path, offset=0.5, duration=10.0)) == 8000
    with pytest.raises(EmptyAudioError, match="ramp.wav"):
        load_audio(path, offset=2.0)


def test_unreadable_missing_and_garbage(tmp_path):
    with pytest.raises(UnreadableAudioError, match="nope.wav: no such file"):
        load_audio(tmp_path / "nope.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a wav file at all" * 10)
    with pytest.raises(UnreadableAudioError, match="garbage.wav"):
        load_audio(garbage)


@pytest.mark.parametrize("ext,fmt,subtype", [("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"),
                                             ("ogg", "OGG", "VORBIS"), ("wav", "WAV", "FLOAT")])  # fmt: skip
def test_truncated_file_is_unreadable(tmp_path, ext, fmt, subtype):
    full = write(tmp_path / f"full.{ext}", np.random.default_rng(0).normal(0, 0.1, 32000), format=fmt,
                 subtype=subtype)  # fmt: skip
    data = full.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableAudioError, match=f"cut.{ext}"):
        load_audio(cut)
    if fmt != "FLAC":  # FLAC's frame count lives in its header; the loss only shows when decoding.
        with pytest.raises(UnreadableAudioError, match=f"cut.{ext}"):
            audio_info(cut)


def test_unsupported_type(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello\n")
    with pytest.raises(UnsupportedAudioTypeError, match="notes.txt.*unsupported audio type '.txt'"):
        load_audio(txt)
    fake_m4a = tmp_path / "song.m4a"
    fake_m4a.write_bytes(b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 100)
    with pytest.raises(UnsupportedAudioTypeError, match="song.m4a"):
        audio_info(fake_m4a)


def test_empty_file(tmp_path):
    path = write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32))
    with pytest.raises(EmptyAudioError, match="empty.wav"):
        load_audio(path)
    with pytest.raises(EmptyAudioError, match="empty.wav"):
        audio_info(path)


def test_nan_and_inf_samples(tmp_path):
    wav = tone(0.5)
    wav[100] = np.nan
    path = write(tmp_path / "nan.wav", wav, subtype="FLOAT")
    with pytest.raises(NonFiniteAudioError, match="nan.wav: contains NaN/Inf samples"):
        load_audio(path)
    wav[100] = np.inf
    path = write(tmp_path / "inf.wav", wav, sr=8000, subtype="FLOAT")
    with pytest.raises(NonFiniteAudioError, match="inf.wav"):
        load_audio(path)


def test_silent_with_configurable_threshold(tmp_path):
    path = write(tmp_path / "quiet.wav", tone(0.5) * 1e-4, subtype="FLOAT")  # peak 3e-5
    with pytest.raises(SilentAudioError, match="quiet.wav: silent"):
        load_audio(path)
    assert len(load_audio(path, silence_threshold=1e-5)) == 8000
    zeros = write(tmp_path / "zeros.wav", np.zeros(4000))
    with pytest.raises(SilentAudioError, match="zeros.wav"):
        load_audio(zeros)


def test_too_short_counts_samples_after_resampling(tmp_path):
    path = write(tmp_path / "short.wav", tone(0.05, sr=8000), 8000)  # 400 samples at 8 kHz -> 800 at 16 kHz
    assert len(load_audio(path, min_samples=800)) == 800
    with pytest.raises(TooShortAudioError, match="short.wav: 800 samples, fewer than the 801"):
        load_audio(path, min_samples=801)


def test_validate_waveform_arrays():
    good = tone(0.1)
    assert validate_waveform(good) is good
    with pytest.raises(EmptyAudioError, match="<array>"):
        validate_waveform(np.zeros(0, np.float32))
    with pytest.raises(NonFiniteAudioError):
        validate_waveform(np.array([0.1, np.inf], np.float32))
    with pytest.raises(SilentAudioError):
        validate_waveform(np.zeros(100, np.float32))
    with pytest.raises(SilentAudioError):
        validate_waveform(np.full(100, 0.01, np.float32), silence_threshold=0.1)
    with pytest.raises(TooShortAudioError, match="clip-7"):
        validate_waveform(good, "clip-7", min_samples=10_000)
    with pytest.raises(AudioError, match="1-D"):
        validate_waveform(np.ones((2, 100), np.float32))
