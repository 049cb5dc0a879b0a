"""A seeded mutation fuzz of the audio decoder, run as a script by ``test_audio_fuzz.py``::

    python _audio_fuzz.py --cases 1000 --seed 0 --dir WORK    # prints one JSON line of results

Seeds are valid files of each container (wav, flac, ogg/vorbis, mp3, aiff); each case mutates one or
two of them: bits flipped, header bytes overwritten, the file cut or grown with junk, a length field
made to lie (RIFF/data sizes, FLAC STREAMINFO, Ogg granule positions, AIFF frame counts), emptied, or
cut to its header; sometimes under the wrong extension. Every case must give finite float32 audio or a
typed ``AudioError`` from both ``audio_info`` and ``load_audio``; anything else is recorded with the
case that caused it. Run in its own process so its peak memory is its own (``peak_rss_mb``).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import struct
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from speechmimic.audio import AudioError, audio_info, load_audio

SR = 16_000


def seed_files(directory: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    mono = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(SR)).astype(np.float32)
    stereo = np.stack([mono[: SR // 2], mono[SR // 2 :]], axis=1)
    specs = [
        ("pcm16.wav", mono, SR, {"subtype": "PCM_16"}),
        ("float.wav", stereo, 22_050, {"subtype": "FLOAT"}),
        ("pcm16.flac", mono, SR, {"subtype": "PCM_16"}),
        ("pcm24.flac", stereo, 44_100, {"subtype": "PCM_24"}),
        ("vorbis.ogg", mono, SR, {"format": "OGG", "subtype": "VORBIS"}),
        ("layer3.mp3", mono, SR, {"format": "MP3", "subtype": "MPEG_LAYER_III"}),
        ("pcm16.aiff", mono, 8_000, {"format": "AIFF", "subtype": "PCM_16"}),
    ]
    paths = []
    for name, data, sr, kw in specs:
        path = directory / name
        sf.write(path, data, sr, **kw)
        paths.append(path)
    return paths


def _u32(rng: random.Random) -> int:
    return rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, rng.getrandbits(32), rng.randrange(1, 1 << 16)])


def _lie(data: bytearray, suffix: str, rng: random.Random) -> None:
    """Overwrite one length, count, rate or channel field of the container with a lie."""
    if suffix == ".wav":
        if rng.random() < 0.5:
            data[4:8] = struct.pack("<I", _u32(rng))  # RIFF size
        pos = data.find(b"data")
        if pos >= 0 and pos + 8 <= len(data):
            data[pos + 4 : pos + 8] = struct.pack("<I", _u32(rng))
        pos = data.find(b"fmt ")
        if pos >= 0 and pos + 16 <= len(data) and rng.random() < 0.5:  # channels, or the rate
            field = rng.choice([(10, "<H"), (12, "<I")])
            data[pos + field[0] : pos + field[0] + struct.calcsize(field[1])] = struct.pack(
                field[1], rng.choice([0, 255, 65535, rng.getrandbits(16)])
            )
    elif suffix == ".flac" and len(data) >= 26:
        bits = int.from_bytes(data[18:26], "big")
        which = rng.randrange(4)
        if which == 0:
            bits = (bits & ~((1 << 36) - 1)) | rng.choice([0, (1 << 36) - 1, rng.getrandbits(36)])
        elif which == 1:
            bits = (bits & ~(7 << 41)) | (rng.randrange(8) << 41)  # channels
        elif which == 2:
            bits = (bits & ((1 << 44) - 1)) | (rng.choice([0, 1, (1 << 20) - 1, rng.getrandbits(20)]) << 44)
        else:
            bits = (bits & ~(31 << 36)) | (rng.randrange(32) << 36)  # bits per sample
        data[18:26] = bits.to_bytes(8, "big")
    elif suffix == ".ogg":
        pages = [i for i in range(len(data) - 14) if data[i : i + 4] == b"OggS"]
        for i in rng.sample(pages, min(len(pages), rng.randint(1, 3))):
            data[i + 6 : i + 14] = struct.pack("<q", rng.choice([-1, 0, 2**62, rng.getrandbits(40)]))
    elif suffix == ".aiff":
        pos = data.find(b"COMM")
        if pos >= 0 and pos + 14 <= len(data):
            data[pos + 10 : pos + 14] = struct.pack(">I", _u32(rng))  # numSampleFrames
            if rng.random() < 0.5:
                data[pos + 8 : pos + 10] = struct.pack(">H", rng.choice([0, 64, 65535]))  # channels
    else:  # mp3: a frame header's bitrate and rate bits
        pos = data.find(b"\xff\xfb")
        if pos >= 0 and pos + 3 <= len(data):
            data[pos + 2] = rng.getrandbits(8)


def mutate(data: bytes, suffix: str, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    kinds = []
    for _ in range(1 if rng.random() < 0.8 else 2):
        kind = rng.choice(["flip", "header", "truncate", "append", "lie", "lie", "empty", "header-only"])
        kinds.append(kind)
        if kind == "flip":
            for _ in range(rng.randint(1, 16)):
                if out:
                    i = rng.randrange(len(out))
                    out[i] ^= 1 << rng.randrange(8)
        elif kind == "header":
            for _ in range(rng.randint(1, 8)):
                if out:
                    i = rng.randrange(min(len(out), 128))
                    out[i] = rng.choice([0, 0xFF, rng.getrandbits(8)])
        elif kind == "truncate":
            del out[rng.randrange(len(out) + 1) :]
        elif kind == "append":
            out += rng.randbytes(rng.randint(1, 4096)) if rng.random() < 0.7 else bytes(out)
        elif kind == "lie":
            _lie(out, suffix, rng)
        elif kind == "empty":
            out = bytearray()
        else:
            del out[rng.choice([4, 12, 28, 44, 58, 64]) :]
    return bytes(out), "+".join(kinds)


def _reset_peak() -> None:
    """Forget the peak RSS so far: it survives fork and exec, so it would report the parent's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(cases: int, seed: int, directory: Path) -> dict:
    _reset_peak()
    directory.mkdir(parents=True, exist_ok=True)
    seeds = [(p.suffix, p.read_bytes()) for p in seed_files(directory)]
    rng = random.Random(seed)
    counts = {"ok": 0, "typed": 0}
    untyped = []
    slowest = 0.0
    t0 = time.time()
    for case in range(cases):
        suffix, data = rng.choice(seeds)
        mutated, kinds = mutate(data, suffix, rng)
        ext = suffix if rng.random() < 0.9 else rng.choice([".wav", ".flac", ".ogg", ".mp3", ".bin"])
        path = directory / f"case{ext}"
        path.write_bytes(mutated)
        start = time.time()
        for fn in (audio_info, load_audio):
            try:
                result = fn(path)
                if fn is load_audio:
                    ok = result.dtype == np.float32 and result.ndim == 1 and np.isfinite(result).all()
                    if not ok:
                        raise AssertionError(f"load_audio returned {result.dtype} {result.shape}")
                    counts["ok"] += 1
            except AudioError:
                counts["typed"] += 1
                break
            except BaseException as e:  # the bug this fuzz looks for
                untyped.append({"case": case, "seed_file": suffix, "ext": ext, "mutation": kinds,
                                "call": fn.__name__, "error": f"{type(e).__name__}: {e}"[:300]})  # fmt: skip
                break
        slowest = max(slowest, time.time() - start)
    return {
        "cases": cases,
        **counts,
        "untyped": untyped,
        "seconds": round(time.time() - t0, 1),
        "slowest_case_seconds": round(slowest, 3),
        "peak_rss_mb": round(_peak_mb(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", required=True)
    args = p.parse_args(argv)
    print(json.dumps(run(args.cases, args.seed, Path(args.dir))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
