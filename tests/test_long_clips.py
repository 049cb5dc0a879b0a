"""Long recordings: a student encodes them in overlapping windows, in bounded memory, and the frames
stitched from the windows stay close to encoding the clip whole; a target that cannot take a clip
that long refuses it before anything is paid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechmimic import load_upstream
from speechmimic.audio import SAMPLE_RATE, load_audio
from speechmimic.student import CHUNK_CONTEXT_SECONDS, CHUNK_TOLERANCE, Student, infer
from speechmimic.targets import load_backend

LIBRISPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "librispeech_test_other_subset"
# Peak RSS allowed for embedding 12 minutes with the tiny student: measured 1,024 MB in 30 s windows
# (~300 MB of it Python and torch; the rest grows linearly: audio and 12 minutes of states); encoding
# whole needs 1,535 MB for 3 minutes already (attention's T x T grows with the square of the length:
# some 10 GB more for 12 minutes).
PEAK_LIMIT_MB = 1300


def _speech(seconds: float, speech_clips) -> np.ndarray:
    """Real speech tiled to ``seconds``: LibriSpeech utterances when the shared data is here, else the
    sentences of the corpus shipped in the package."""
    files = sorted(LIBRISPEECH.rglob("*.flac"))[:20]
    pool, _ = speech_clips
    parts = [load_audio(f) for f in files] or [c.load() for c in pool if c.labels["kind"] == "sentence"]
    return np.resize(np.concatenate(parts), int(seconds * SAMPLE_RATE))


def test_frames_away_from_the_joins_match_the_whole_clip(tiny_student, speech_clips):
    student, _ = Student.load(tiny_student[0])
    wav = torch.from_numpy(_speech(45, speech_clips))
    whole_states, whole_preds = infer(student, wav, chunk_seconds=None)
    states, preds = infer(student, wav, chunk_seconds=16)
    # Windows of 16 s keep their middle 8 s: joins every 8 s; "away" is more than the context from one.
    # The front end sees less than the context: equal everywhere, so the windows are stitched in place.
    torch.testing.assert_close(states[0], whole_states[0], atol=1e-5, rtol=1e-5)
    pairs = list(zip(states[1:], whole_states[1:], strict=True)) + [(preds[k], whole_preds[k]) for k in preds]
    for got, want in pairs:
        assert got.shape == want.shape
        seconds = torch.arange(len(want)) * 45 / len(want)
        away = ((seconds + 4) % 8 - 4).abs() > CHUNK_CONTEXT_SECONDS / 2
        rel = (torch.linalg.norm(got - want, dim=-1) / torch.linalg.norm(want, dim=-1))[away]
        assert float(rel.mean()) < CHUNK_TOLERANCE
        assert float(torch.nn.functional.cosine_similarity(got, want, dim=-1).min()) > 0.95
    # A clip no longer than a window is encoded whole, exactly as before.
    short = wav[: 10 * SAMPLE_RATE]
    assert torch.equal(infer(student, short)[0][-1], infer(student, short, chunk_seconds=None)[0][-1])


def _peak_mb(argv: list[str]) -> int:
    """Peak RSS (VmHWM) of ``speechmimic ARGV`` run in a fresh interpreter."""
    code = (
        "import sys; from speechmimic.cli import main; rc = main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print(rc, int(hwm) // 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    rc, peak = out.stdout.split()[-2:]
    assert rc == "0", out.stderr
    return int(peak)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc")
def test_a_12_minute_clip_embeds_in_bounded_memory(tmp_path, tiny_student, speech_clips):
    student = str(tiny_student[0])
    for minutes in (12, 3):
        sf.write(tmp_path / f"{minutes}min.wav", _speech(minutes * 60, speech_clips), SAMPLE_RATE)
    chunked = _peak_mb(
        ["embed", "--model", student, "--out", str(tmp_path / "12.npz"), str(tmp_path / "12min.wav")]
    )
    out = np.load(tmp_path / "12.npz")
    assert out["0/pred.lstm3"].shape[0] == 2 * (12 * 60 * 50 + 1)  # every frame of the 12 minutes, at 100 Hz
    assert chunked < PEAK_LIMIT_MB
    # The limit means something: encoding whole a clip a quarter as long already exceeds it.
    whole = _peak_mb(
        [
            "embed",
            "--model",
            student,
            "--out",
            str(tmp_path / "3.npz"),
            str(tmp_path / "3min.wav"),
            "--chunk-seconds",
            "none",
        ]
    )
    assert whole > PEAK_LIMIT_MB, (chunked, whole)


class _ShortRequests:
    """resemblyzer behind an API that takes at most 20 s a request."""

    def __init__(self):
        self.inner = load_backend("resemblyzer")
        self.spec, self.frame_rate, self.layers = "short-requests", self.inner.frame_rate, self.inner.layers
        self.padding, self.min_samples, self.max_samples = (
            "per_clip",
            self.inner.min_samples,
            20 * SAMPLE_RATE,
        )
        self.clips = 0

    def __call__(self, wavs, keys=None):
        self.clips += len(wavs)
        return self.inner(wavs)


def test_a_target_that_cannot_take_a_clip_that_long_says_so(tmp_path, speech_clips):
    target = _ShortRequests()
    upstream = load_upstream(target, ledger=tmp_path / "ledger")
    with pytest.raises(ValueError) as e:
        upstream([torch.from_numpy(_speech(90, speech_clips))])
    assert str(e.value) == (
        "a clip of 90.0 s is longer than short-requests takes (20.0 s at most): cut long recordings into "
        "segments first (speechmimic corpus scan --max-seconds N)"
    )
    assert target.clips == 0
