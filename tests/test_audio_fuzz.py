"""Untrusted audio: a lying header never drives an allocation, and one bad file never stops a run."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechmimic.audio import ImplausibleHeaderError, TooLongAudioError, audio_info, load_audio
from speechmimic.corpus import Clip, scan

HERE = Path(__file__).resolve().parent
FUZZ = HERE / "_audio_fuzz.py"
SR = 16_000
ADDRESS_SPACE = 4 << 30  # a child that tried to allocate from a header's claim would fail, not swap


def _noise_flac(path: Path, seconds: float = 1.0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32), SR, subtype="PCM_16")
    return path


def _claim(path: Path, frames: int | None = None, channels: int | None = None) -> Path:
    """Rewrite the FLAC STREAMINFO's total samples and/or channel count (the rest is left true)."""
    raw = bytearray(path.read_bytes())
    bits = int.from_bytes(raw[18:26], "big")
    if frames is not None:
        bits = (bits & ~((1 << 36) - 1)) | frames
    if channels is not None:
        bits = (bits & ~(7 << 41)) | ((channels - 1) << 41)
    raw[18:26] = bits.to_bytes(8, "big")
    path.write_bytes(bytes(raw))
    return path


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_the_lying_flac_is_a_typed_error_and_the_scan_goes_on(tmp_path, capsys):
    from speechmimic.cli import main

    folder = tmp_path / "corpus"
    folder.mkdir()
    _noise_flac(folder / "good.flac")
    # The case of the issue: 14 KB-ish of FLAC whose STREAMINFO claims 38.6 G frames of 8 channels.
    lie = _claim(_noise_flac(folder / "lie.flac", seed=1), frames=38_600_000_000, channels=8)
    for call in (load_audio, audio_info):
        with pytest.raises(ImplausibleHeaderError, match="header claims 38600000000 frames of 8 channels"):
            call(lie)
    result = scan(folder, progress=False)
    assert [c.id for c in result.clips] == ["good"]
    assert [(Path(p).name, "header claims" in r) for p, r in result.skipped] == [("lie.flac", True)]
    assert main(["corpus", "scan", str(folder), "--out", str(tmp_path / "m.jsonl"), "--no-progress"]) == 0
    assert "skipped" in capsys.readouterr().out and (tmp_path / "m.jsonl").exists()
    # A caller's duration limit is checked from the header, before decoding.
    with pytest.raises(TooLongAudioError, match="longer than the 0.5 s allowed"):
        load_audio(folder / "good.flac", max_seconds=0.5)
    assert [c.id for c in scan(folder, progress=False, max_file_seconds=0.5).clips] == []


def _fuzz(cases: int, tmp_path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, str(FUZZ), "--cases", str(cases), "--seed", "0", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
        preexec_fn=_limited,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(result: dict, cases: int) -> None:
    print(json.dumps({k: v for k, v in result.items() if k != "untyped"}))
    assert result["untyped"] == [], result["untyped"][:10]
    assert result["ok"] + result["typed"] == cases
    assert result["ok"] > 0.1 * cases and result["typed"] > 0.1 * cases  # both outcomes really occur
    assert result["peak_rss_mb"] < 150, result["peak_rss_mb"]  # MB; importing numpy and soundfile: ~30


def test_fuzz_1000_mutated_files_give_audio_or_typed_errors(tmp_path):
    _check(_fuzz(1000, tmp_path), 1000)


@pytest.mark.slow
def test_fuzz_10000_mutated_files_give_audio_or_typed_errors(tmp_path):
    _check(_fuzz(10_000, tmp_path), 10_000)


MEMORY_PROBE = """
import json, sys, tracemalloc
from speechmimic.audio import AudioError, load_audio
load_audio(sys.argv[3])  # warm up the decoder and resampler
tracemalloc.start()  # numpy reports its buffers to tracemalloc: the peak of what decoding allocated
try:
    load_audio(sys.argv[1])
    lying = "decoded"
except AudioError as e:
    lying = type(e).__name__ + ": " + e.reason
lie_mb = tracemalloc.get_traced_memory()[1] / 2**20
tracemalloc.reset_peak()
wav = load_audio(sys.argv[2])
real_mb = tracemalloc.get_traced_memory()[1] / 2**20
print(json.dumps({"lie_mb": lie_mb, "real_mb": real_mb, "real_audio_mb": wav.nbytes / 2**20, "lying": lying}))
"""


def test_decoding_memory_follows_the_audio_not_the_header(tmp_path):
    # 1 s of audio claiming 200 M frames (3.5 h): within what its bytes could hold, so the header
    # passes, and the old decoder would have allocated 800 MB for it.
    lie = _claim(_noise_flac(tmp_path / "lie.flac"), frames=200_000_000)
    assert audio_info(lie)[1] == 200_000_000
    real = _noise_flac(tmp_path / "real.flac", seconds=300.0)  # 5 min, 18 MB of float32 once decoded
    small = _noise_flac(tmp_path / "small.flac", seconds=0.5)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(lie), str(real), str(small)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limited,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout)
    print(m)
    assert m["lying"].startswith("UnreadableAudioError"), m  # typed, and found at the real end of data
    assert m["lie_mb"] < 2, m  # the claim of 763 MB allocated nothing; one block of the real second
    assert m["real_mb"] < 2.5 * m["real_audio_mb"] + 2, m  # the blocks of real audio and their joining


def test_one_bad_clip_stops_no_reader(tmp_path, speech_clips, capsys):
    """query, distill, fidelity, stage 1, probe and embed each leave out a clip that does not decode,
    name it with its reason, and finish."""
    from speechmimic.cli import main
    from speechmimic.distill import DistillConfig, PairedClips, distill
    from speechmimic.fidelity import heldout_fidelity
    from speechmimic.ledger import Ledger, query_clips
    from speechmimic.pretrain import PretrainConfig, pretrain
    from speechmimic.probe import ProbeConfig, probe
    from speechmimic.targets import load_backend
    from speechmimic.tasks import write_task

    pool, heldout = speech_clips
    liar = _claim(_noise_flac(tmp_path / "liar.flac"), channels=8)  # the stream has 1: undecodable
    bad = Clip("bad-clip", str(liar), SR, SR, 1.0, labels=dict(pool[0].labels))
    # A clip that decoded when it was paid for, and whose file is broken afterwards.
    later = tmp_path / "later.flac"
    sf.write(later, pool[5].load(), SR)
    broken = Clip(
        "broken-later", str(later), SR, len(pool[5].load()), pool[5].duration, labels=dict(pool[5].labels)
    )
    clips = [*pool[:5], broken, bad]
    target = load_backend("resemblyzer?layers=2")

    stats = query_clips(target, clips, Ledger(tmp_path / "ledger"), progress=False)
    assert stats["paid"] == 6 and [c for c, _ in stats["unusable"]] == ["bad-clip"]
    held = [*heldout[:2], bad]
    heldout_fidelity_args = (target, held, Ledger(tmp_path / "eval"))
    later.write_bytes(b"RIFF" + bytes(100))  # bit rot after the queries

    paired = PairedClips(clips, Ledger(tmp_path / "ledger"))
    assert len(paired) == 5 and list(paired.unusable) == ["broken-later"]
    student = distill(clips, Ledger(tmp_path / "ledger"), tmp_path / "student", DistillConfig(steps=1),
                      preset="tiny", progress=False)  # fmt: skip
    fid = heldout_fidelity(student, *heldout_fidelity_args, progress=False)
    assert fid["lstm2"]["frames"] > 0
    assert "held-out fidelity: skipped 1 unusable clip(s): bad-clip" in capsys.readouterr().err

    cfg = PretrainConfig(steps=1, warmup=1, batch_seconds=10, k=4, kmeans_frames=1000)
    pretrain(clips, tmp_path / "stage1", cfg, preset="tiny", progress=False)
    saved = json.loads((tmp_path / "stage1" / "iter1" / "config.json").read_text())
    assert saved["clips"] == 5 and sorted(saved["unusable"]) == ["bad-clip", "broken-later"]

    splits = {"train": [*pool[:4], bad], "dev": pool[4:6], "test": pool[6:8]}
    task = write_task(tmp_path / "task", "t", "classify", "kind", splits)
    result = probe("mfcc", task, cfg=ProbeConfig(max_epochs=1), progress=False)
    assert result["splits"]["train"] == 4 and list(result["unusable"]) == ["bad-clip"]

    good = tmp_path / "good.flac"
    sf.write(good, pool[0].load(), SR)
    npz = tmp_path / "e.npz"
    capsys.readouterr()
    assert main(["embed", "--model", "mfcc", "--out", str(npz), str(good), str(liar)]) == 0
    assert f"skipped {liar}: " in capsys.readouterr().out
    with np.load(npz) as f:
        assert list(f["skipped"]) == [str(liar)] and "0/mfcc" in f.files and "1/mfcc" not in f.files
    assert main(["embed", "--model", "mfcc", "--out", str(npz), str(liar)]) == 1  # nothing readable
