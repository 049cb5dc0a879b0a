import argparse
import json
import math
import os
import pickle
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechmimic.cli.corpus import register
from speechmimic.corpus import (
    Clip,
    ScanResult,
    count_manifest,
    iter_manifest,
    read_manifest,
    scan,
    write_manifest,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def noise(path, seconds=0.2, sr=16000, seed=0, **kw):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(round(seconds * sr))).astype(np.float32), sr, **kw)
    return path


def make_librispeech(root):
    # Nested variant with a transcript, plus the flat variant without one.
    for utt in range(2):
        noise(root / "84" / "121123" / f"84-121123-{utt:04d}.flac", seed=utt)
    (root / "84" / "121123" / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n"
    )
    noise(root / "1688" / "1688-142285-0003.flac", seed=3)


def make_speech_commands(root):
    for word in ("yes", "no"):
        for i, h in enumerate(("0a7c2a8d", "0b09edd3", "0c40e715")):
            noise(root / word / f"{h}_nohash_{i}.wav", seconds=0.1, seed=i)
    noise(root / "_background_noise_" / "white_noise.wav", seconds=0.5)
    (root / "testing_list.txt").write_text("yes/0a7c2a8d_nohash_0.wav\nno/0a7c2a8d_nohash_0.wav\n")
    (root / "validation_list.txt").write_text("yes/0b09edd3_nohash_1.wav\n")
    (root / "README.md").write_text("not audio, ignored\n")


def make_fsdd(root):
    for name in ("0_george_0", "0_george_7", "9_yweweler_4", "3_theo_49"):
        noise(root / "recordings" / f"{name}.wav", seconds=0.1, sr=8000)


# ---------------------------------------------------------------- manifests


def test_manifest_round_trip_with_relative_paths(tmp_path):
    audio = noise(tmp_path / "data" / "a.wav", seconds=0.5)
    outside = noise(tmp_path / "elsewhere" / "b.wav", seconds=0.25)
    clips = [
        Clip("a", str(audio), 16000, 8000, 0.5, labels={"speaker": "x", "segment": 1}),
        Clip("b", str(outside), 16000, 2000, 0.125, offset=0.125),
    ]
    manifest = tmp_path / "data" / "manifest.jsonl"
    write_manifest(clips, manifest)

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert set(rows[0]) == {"id", "path", "sampling_rate", "num_samples", "duration", "offset", "labels"}
    assert rows[0]["path"] == "a.wav"
    assert rows[1]["path"] == str(outside.resolve())
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["a.wav", "manifest.jsonl"]  # no temp left

    assert read_manifest(manifest) == [
        Clip("a", str(audio.resolve()), 16000, 8000, 0.5, labels={"speaker": "x", "segment": 1}),
        Clip("b", str(outside.resolve()), 16000, 2000, 0.125, offset=0.125),
    ]
    # The manifest moves with its data: relative paths resolve against the manifest's folder.
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    first = next(iter_manifest(moved / "manifest.jsonl"))
    assert first.path == str(moved / "a.wav")
    assert len(first.load()) == 8000
    assert Clip.from_dict(first.to_dict()) == first


def test_streaming_a_manifest_keeps_nothing_per_clip(tmp_path):
    manifest, copy = tmp_path / "m.jsonl", tmp_path / "copy.jsonl"
    clips = (
        Clip(f"c{i}", str(tmp_path / f"d{i % 50}" / f"f{i}.wav"), 16000, 16000, 1.0) for i in range(20_000)
    )
    write_manifest(clips, manifest)
    write_manifest(iter_manifest(manifest), copy)  # the first pass's one-off allocations are not per clip
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    write_manifest(iter_manifest(manifest), copy)
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert copy.read_text() == manifest.read_text() and count_manifest(copy) == 20_000
    assert kept < 200_000  # a Path per clip would intern every file name: ~2 MB here


def test_malformed_manifest_line_names_file_and_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    good = json.dumps(Clip("a", "a.wav", 16000, 10, 0.1).to_dict())
    manifest.write_text(good + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:3: malformed"):
        read_manifest(manifest)
    manifest.write_text(good + "\n" + json.dumps({"id": "b", "path": "b.wav"}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: .*missing keys"):
        read_manifest(manifest)


# ---------------------------------------------------------------- layouts


def test_librispeech_layout(tmp_path):
    make_librispeech(tmp_path)
    result = scan(tmp_path, progress=False)
    assert result.layout == "librispeech" and result.skipped == []
    by_id = {c.id: c for c in result.clips}
    assert list(by_id) == ["1688-142285-0003", "84-121123-0000", "84-121123-0001"]  # sorted paths
    assert by_id["84-121123-0001"].labels == {
        "speaker": "84",
        "chapter": "121123",
        "text": "BUT IN LESS THAN FIVE MINUTES",
    }
    assert by_id["1688-142285-0003"].labels == {"speaker": "1688", "chapter": "142285"}
    clip = by_id["84-121123-0000"]
    assert (clip.sampling_rate, clip.num_samples, clip.duration, clip.offset) == (16000, 3200, 0.2, 0.0)


def test_speech_commands_layout(tmp_path):
    make_speech_commands(tmp_path)
    result = scan(tmp_path, progress=False)
    assert result.layout == "speech_commands"
    assert len(result.clips) == 6
    noise_file = str(tmp_path.resolve() / "_background_noise_" / "white_noise.wav")
    assert result.skipped == [(noise_file, "background noise recording, not an utterance")]
    labels = {c.id: c.labels for c in result.clips}
    assert labels["yes-0a7c2a8d_nohash_0"] == {"word": "yes", "speaker": "0a7c2a8d", "split": "test"}
    assert labels["yes-0b09edd3_nohash_1"]["split"] == "validation"
    assert labels["no-0b09edd3_nohash_1"]["split"] == "train"
    assert sorted(c.labels["split"] for c in result.clips).count("train") == 3


def test_fsdd_layout(tmp_path):
    make_fsdd(tmp_path)
    result = scan(tmp_path, progress=False)
    assert result.layout == "fsdd"
    labels = {c.id: c.labels for c in result.clips}
    assert labels["9_yweweler_4"] == {"digit": 9, "speaker": "yweweler", "index": 4, "split": "test"}
    assert labels["0_george_7"]["split"] == "train"
    assert labels["3_theo_49"]["digit"] == 3
    assert all(c.sampling_rate == 8000 and c.num_samples == 800 for c in result.clips)


def test_plain_layout_and_forced_layout(tmp_path):
    noise(tmp_path / "top.wav")
    noise(tmp_path / "ogg" / "x.ogg", format="OGG")
    noise(tmp_path / "sub" / "x.flac")
    noise(tmp_path / "sub" / "x.wav")  # same stem as x.flac: ids must stay unique
    result = scan(tmp_path, progress=False)
    assert result.layout == "plain" and result.skipped == []
    assert [(c.id, c.labels) for c in result.clips] == [
        ("ogg-x", {"folder": "ogg"}),
        ("sub-x", {"folder": "sub"}),
        ("sub-x.wav", {"folder": "sub"}),
        ("top", {}),
    ]
    forced = scan(tmp_path, layout="fsdd", progress=False)
    assert forced.layout == "fsdd" and forced.clips == []
    assert len(forced.skipped) == 4 and all("does not follow" in r for _, r in forced.skipped)
    with pytest.raises(ValueError, match="unknown layout"):
        scan(tmp_path, layout="timit", progress=False)


def test_bad_files_are_skipped_not_fatal(tmp_path):
    make_fsdd(tmp_path)
    rec = tmp_path / "recordings"
    full = noise(rec / "1_bad_0.wav", seconds=0.5)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])  # header promises more frames than the file holds
    nan = np.full(800, 0.1, np.float32)
    nan[10] = np.nan
    sf.write(rec / "2_bad_1.wav", nan, 8000, subtype="FLOAT")
    sf.write(rec / "3_bad_2.wav", np.zeros(800, np.float32), 8000)
    (rec / "4_bad_3.wav").write_bytes(b"")
    (rec / "5_bad_4.mp4").write_bytes(b"not decodable by libsndfile")

    result = scan(tmp_path, progress=False)
    assert result.layout == "fsdd"
    assert len(result.clips) == 4
    reasons = {Path(p).name: r for p, r in result.skipped}
    assert set(reasons) == {"1_bad_0.wav", "2_bad_1.wav", "3_bad_2.wav", "4_bad_3.wav", "5_bad_4.mp4"}
    assert "truncated" in reasons["1_bad_0.wav"]
    assert reasons["2_bad_1.wav"] == "contains NaN/Inf samples"
    assert reasons["3_bad_2.wav"].startswith("silent")
    assert "unsupported audio type" in reasons["5_bad_4.mp4"]


def test_min_samples_is_checked_at_16k(tmp_path):
    make_fsdd(tmp_path)  # 800 samples at 8 kHz -> 1600 at 16 kHz
    assert len(scan(tmp_path, min_samples=1600, progress=False).clips) == 4
    result = scan(tmp_path, min_samples=1601, progress=False)
    assert result.clips == [] and all("fewer than the 1601" in r for _, r in result.skipped)


def test_long_clips_are_segmented(tmp_path):
    noise(tmp_path / "long.wav", seconds=2.5, sr=8000)
    noise(tmp_path / "short.wav", seconds=0.5, sr=8000)
    result = scan(tmp_path, max_segment_seconds=1.0, progress=False)
    segs = [c for c in result.clips if c.id.startswith("long")]
    assert [c.id for c in segs] == ["long@0", "long@1", "long@2"]
    assert all(c.num_samples == 6666 and c.duration == 6666 / 8000 <= 1.0 for c in segs)
    assert [c.offset for c in segs] == [0.0, 6666 / 8000, 2 * 6666 / 8000]
    assert [c.labels["segment"] for c in segs] == [0, 1, 2]
    whole = sf.read(tmp_path / "long.wav", dtype="float32")[0]
    np.testing.assert_array_equal(segs[1].load(sample_rate=8000), whole[6666:13332])
    assert len(segs[2].load()) == 13332
    assert [c.id for c in result.clips if c.id.startswith("short")] == ["short"]
    assert math.ceil(2.5 / 1.0) == len(segs)


def test_segments_are_validated_on_their_own(tmp_path):
    wav = np.zeros(32000, np.float32)
    wav[:16000] = 0.1 * np.random.default_rng(0).standard_normal(16000)
    sf.write(tmp_path / "half.wav", wav, 16000)
    result = scan(tmp_path, max_segment_seconds=1.0, progress=False)
    assert [c.id for c in result.clips] == ["half@0"]
    assert result.skipped[0][0].endswith("half.wav@1") and result.skipped[0][1].startswith("silent")


def test_a_long_file_is_scanned_a_segment_at_a_time(tmp_path):
    import tracemalloc

    noise(tmp_path / "hour.flac", seconds=180, sr=16000)  # 11.5 MB as float32 at once
    tracemalloc.start()
    result = scan(tmp_path, max_segment_seconds=2.0, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(result.clips) == 90 and not result.skipped
    assert peak < 2_000_000, f"peak {peak / 1e6:.1f} MB: the file was decoded whole"
    whole = sf.read(tmp_path / "hour.flac", dtype="float32")[0]
    np.testing.assert_array_equal(result.clips[45].load(), whole[45 * 32000 : 46 * 32000])


def test_a_file_silent_throughout_is_skipped_once(tmp_path):
    sf.write(tmp_path / "quiet.wav", np.zeros(48000, np.float32), 16000)
    result = scan(tmp_path, max_segment_seconds=1.0, progress=False)
    assert not result.clips
    assert [(Path(p).name, r.split(":")[0]) for p, r in result.skipped] == [("quiet.wav", "silent")]


@pytest.fixture
def shared_tmp():
    """A folder every user may read: the scan below may run as another user (see _scan_as_a_user)."""
    root = Path(tempfile.mkdtemp(prefix="speechmimic-scan-"))
    root.chmod(0o755)
    yield root
    for folder, dirs, _ in os.walk(root):
        for d in dirs:
            if not Path(folder, d).is_symlink():
                Path(folder, d).chmod(0o755)
    shutil.rmtree(root)


def _scan_as_a_user(root: Path) -> ScanResult:
    """``scan(root)`` by a user that file permissions apply to. Root reads a chmod 000 folder all the
    same, so as root the scan runs in a forked child that first becomes ``nobody``: a subprocess could
    not, since this interpreter may live under root's home."""
    if os.geteuid() != 0:
        return scan(root, progress=False)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, scan, send the result back pickled, never return to pytest
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = scan(root, progress=False)
            with os.fdopen(write, "wb") as fh:
                pickle.dump(result, fh)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, "the scan as nobody failed"
    return pickle.loads(data)


def test_folders_it_cannot_read_and_dangling_links_are_listed(shared_tmp, capsys):
    good = noise(shared_tmp / "spk1" / "a.wav", seconds=0.3)
    noise(shared_tmp / "locked" / "b.wav", seconds=0.3)
    (shared_tmp / "locked").chmod(0o000)
    (shared_tmp / "spk1" / "gone.wav").symlink_to(shared_tmp / "moved" / "gone.wav")
    (shared_tmp / "spk2").symlink_to(shared_tmp / "spk1")  # a link to a folder: not followed
    result = _scan_as_a_user(shared_tmp)
    assert [c.path for c in result.clips] == [str(good)]
    assert result.skipped == [
        (str(shared_tmp / "locked"), "folder cannot be read (Permission denied): its files are not scanned"),
        (
            str(shared_tmp / "spk1" / "gone.wav"),
            f"dangling link: its target {shared_tmp / 'moved' / 'gone.wav'} does not exist",
        ),
        (
            str(shared_tmp / "spk2"),
            f"link to a folder ({shared_tmp / 'spk1'}), not followed: scan that folder",
        ),
    ]
    # The command line lists them as it lists every skipped file.
    (shared_tmp / "locked").chmod(0o755)
    (shared_tmp / "locked" / "b.wav").unlink()
    assert (
        run_cli(["corpus", "scan", str(shared_tmp), "--out", str(shared_tmp / "m.jsonl"), "--no-progress"])
        == 0
    )
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"  skipped {shared_tmp / 'spk1' / 'gone.wav'}: dangling link: its target "
        f"{shared_tmp / 'moved' / 'gone.wav'} does not exist",
        f"  skipped {shared_tmp / 'spk2'}: link to a folder ({shared_tmp / 'spk1'}), not followed: "
        "scan that folder",
    ]


# ---------------------------------------------------------------- CLI


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="speechmimic")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_scan(tmp_path, capsys):
    make_fsdd(tmp_path / "fsdd")
    (tmp_path / "fsdd" / "recordings" / "1_bad_0.wav").write_bytes(b"RIFF")
    out = tmp_path / "out" / "fsdd.jsonl"
    skipped = tmp_path / "out" / "skipped.tsv"
    code = run_cli(
        [
            "corpus",
            "scan",
            str(tmp_path / "fsdd"),
            "--out",
            str(out),
            "--skipped",
            str(skipped),
            "--no-progress",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "layout 'fsdd'" in text and "4 clips" in text and "1 skipped" in text and "1_bad_0.wav" in text
    clips = read_manifest(out)
    assert len(clips) == 4 and clips[0].labels["speaker"] == "george"
    assert skipped.read_text().startswith(str((tmp_path / "fsdd" / "recordings" / "1_bad_0.wav").resolve()))
    assert json.loads(out.read_text().splitlines()[0])["path"].startswith("/")  # audio outside out/


def test_cli_summary_truncates_skipped_list(tmp_path, capsys):
    for i in range(25):
        (tmp_path / f"bad{i:02d}.wav").write_bytes(b"junk")
    noise(tmp_path / "good.wav")
    out = tmp_path / "m.jsonl"
    assert run_cli(["corpus", "scan", str(tmp_path), "--out", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.strip().startswith("skipped") for line in lines) == 20
    assert lines[-1].strip() == "... and 5 more"
    assert read_manifest(out)[0].path == str((tmp_path / "good.wav").resolve())


def test_cli_errors(tmp_path, capsys):
    assert run_cli(["corpus", "scan", str(tmp_path / "missing"), "--out", str(tmp_path / "m.jsonl")]) == 2
    (tmp_path / "empty").mkdir()
    assert run_cli(["corpus", "scan", str(tmp_path / "empty"), "--out", str(tmp_path / "m.jsonl")]) == 1
    assert not (tmp_path / "m.jsonl").exists()
    with pytest.raises(SystemExit):
        run_cli(["corpus", "scan", str(tmp_path), "--out", "m.jsonl", "--layout", "timit"])


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize(
    "folder,layout,n_clips,labels",
    [
        ("librispeech_test_other_subset", "librispeech", 100, {"speaker", "chapter"}),
        ("speech_commands_subset", "speech_commands", 300, {"word", "speaker", "split"}),
        ("fsdd", "fsdd", 3000, {"digit", "speaker", "index", "split"}),
    ],
)
def test_real_subsets(folder, layout, n_clips, labels):
    root = SHARED / folder
    if not root.is_dir():
        pytest.skip(f"real speech subset {root} is absent (see shared/data/README.md)")
    result = scan(root, progress=False)
    assert result.layout == layout
    assert len(result.clips) == n_clips and result.skipped == []
    assert all(set(c.labels) == labels for c in result.clips)
    assert len({c.id for c in result.clips}) == n_clips


def test_a_scan_with_workers_is_the_serial_scan(tmp_path):
    make_fsdd(tmp_path)
    rec = tmp_path / "recordings"
    sf.write(rec / "3_bad_2.wav", np.zeros(800, np.float32), 8000)  # silent: skipped by a worker
    long = 0.1 * np.random.default_rng(1).standard_normal(16000 * 5).astype(np.float32)
    sf.write(rec / "4_long_0.wav", long, 16000)
    serial = scan(tmp_path, max_segment_seconds=2.0, progress=False)
    parallel = scan(tmp_path, max_segment_seconds=2.0, progress=False, workers=2)
    assert parallel == serial and len(serial.clips) > 4 and serial.skipped
    assert [c.id for c in serial.clips if c.id.startswith("4_long_0")] == [f"4_long_0@{k}" for k in range(3)]
