"""Decoding and validation of audio files: every waveform that reaches a model goes through here.

Bad inputs raise one typed subclass of :class:`AudioError` per kind of problem, so callers (the
corpus scanner above all) can skip a file and say why instead of crashing mid-run. Files are
untrusted: a header's claims (channels, rate, length) are checked against the file's size and sane
limits before anything is read, decoding goes in bounded blocks, and whatever the decoder raises on a
stranger's bytes becomes this file's typed error, never the run's (nor a ``MemoryError``).
"""

from __future__ import annotations

import os
import struct

import numpy as np
import soundfile as sf
import soxr

from speechmimic.errors import InputError

SAMPLE_RATE = 16_000
DEFAULT_SILENCE_THRESHOLD = 1e-4

PathLike = str | os.PathLike


class AudioError(InputError):
    """An audio file or array that cannot be used; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # Keeps the two-argument constructor working across pickling (e.g. from worker processes).
        return (type(self), (self.path, self.reason))


class UnreadableAudioError(AudioError):
    """Missing, corrupt or truncated file."""


class UnsupportedAudioTypeError(AudioError):
    """A file type that soundfile (libsndfile) cannot decode."""


class EmptyAudioError(AudioError):
    """Zero samples."""


class NonFiniteAudioError(AudioError):
    """NaN or Inf samples."""


class SilentAudioError(AudioError):
    """Peak amplitude below the silence threshold."""


class TooShortAudioError(AudioError):
    """Fewer samples than the model's receptive field."""


class ImplausibleHeaderError(UnreadableAudioError):
    """A header claiming channels, a rate or a length the file cannot hold (a lying or corrupt header)."""


class TooLongAudioError(AudioError):
    """Longer than the caller allows (``max_seconds``)."""


# What a header may claim. Speech needs neither more channels nor rates outside these.
MAX_CHANNELS = 32
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 384_000
# The most frames one byte of a compressed file can plausibly carry: FLAC of digital silence at its
# largest block size stays under ~5,500, Vorbis and MP3 far under; a header claiming more is lying.
MAX_FRAMES_PER_BYTE = 8192
# Frames decoded per read: memory grows with the audio actually found, one block at a time.
BLOCK_FRAMES = 1 << 16
# Bytes per sample of the uncompressed subtypes, whose frame count the file size bounds exactly.
_PCM_BYTES = {
    "PCM_S8": 1, "PCM_U8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4,
    "FLOAT": 4, "DOUBLE": 8,
}  # fmt: skip
_COMPRESSED_FORMATS = frozenset({"FLAC", "OGG", "MP3", "MPEG"})

# Audio extensions the scanner looks at, mapped to the libsndfile format that decodes them (None:
# audio libsndfile never decodes; such files are reported as skipped rather than silently ignored).
_EXTENSION_FORMATS = {
    ".wav": "WAV", ".wave": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG", ".opus": "OGG",
    ".mp3": "MP3", ".aiff": "AIFF", ".aif": "AIFF", ".aifc": "AIFF", ".au": "AU", ".snd": "AU",
    ".caf": "CAF", ".w64": "W64", ".rf64": "RF64",
    ".m4a": None, ".aac": None, ".wma": None, ".webm": None, ".mp4": None, ".amr": None,
}  # fmt: skip
AUDIO_EXTENSIONS = frozenset(_EXTENSION_FORMATS)
# MP3 decodes only with libsndfile >= 1.1, hence the check against this installation.
DECODABLE_EXTENSIONS = frozenset(
    ext for ext, fmt in _EXTENSION_FORMATS.items() if fmt is not None and fmt in sf.available_formats()
)


def _riff_data_sizes(path: str) -> tuple[int, int, int] | None:
    """(declared data bytes, bytes actually present, block align) of a RIFF/WAVE file, if knowable."""
    file_size = os.path.getsize(path)
    block_align = 1
    with open(path, "rb") as fh:
        header = fh.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= file_size:
            fh.seek(pos)
            chunk_id, size = struct.unpack("<4sI", fh.read(8))
            if chunk_id == b"fmt " and size >= 14:
                fmt = fh.read(14)
                if len(fmt) == 14:
                    block_align = struct.unpack("<H", fmt[12:14])[0] or 1
            elif chunk_id == b"data":
                # 0 and 0xFFFFFFFF are placeholders written by streaming encoders, not a promise.
                if size in (0, 0xFFFFFFFF):
                    return None
                return size, file_size - pos - 8, block_align
            pos += 8 + size + (size & 1)
    return None


def _open(path: PathLike, max_seconds: float | None = None) -> sf.SoundFile:
    p = os.fspath(path)  # a string, not a Path: pathlib interns every file name it parses, forever
    if not os.path.exists(p):
        raise UnreadableAudioError(path, "no such file")
    if not os.path.isfile(p):
        raise UnreadableAudioError(path, "not a regular file")
    try:
        f = sf.SoundFile(p)
    except Exception as e:  # whatever libsndfile makes of a stranger's bytes, it is this file's failure
        ext = os.path.splitext(p)[1].lower()
        if ext in DECODABLE_EXTENSIONS:
            raise UnreadableAudioError(path, f"cannot decode ({e})") from e
        kind = f"'{ext}'" if ext else "files without extension"
        raise UnsupportedAudioTypeError(
            path, f"unsupported audio type {kind} (decodable: wav, flac, ogg and other libsndfile formats)"
        ) from e
    try:
        _check_claims(f, p, max_seconds)
        _check_complete(f, p)
    except AudioError:
        f.close()
        raise
    except Exception as e:
        f.close()
        raise UnreadableAudioError(path, f"corrupt header ({type(e).__name__}: {e})") from e
    return f


def _check_claims(f: sf.SoundFile, path: str, max_seconds: float | None) -> None:
    """Refuse a header whose channels, rate or length the file cannot hold, before anything is read:
    nothing is ever allocated from what a header claims."""
    if not 1 <= f.channels <= MAX_CHANNELS:
        raise ImplausibleHeaderError(path, f"header claims {f.channels} channels (at most {MAX_CHANNELS})")
    if not MIN_SAMPLE_RATE <= f.samplerate <= MAX_SAMPLE_RATE:
        raise ImplausibleHeaderError(
            path, f"header claims {f.samplerate} Hz (accepted: {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz)"
        )
    size = os.path.getsize(path)
    width = _PCM_BYTES.get(f.subtype)
    if width is not None and f.format not in _COMPRESSED_FORMATS:
        most = size // (width * f.channels)  # uncompressed: the bytes bound the frames exactly
    else:
        most = size * MAX_FRAMES_PER_BYTE
    if f.frames > most:
        raise ImplausibleHeaderError(
            path,
            f"header claims {f.frames} frames of {f.channels} channels; {size} bytes hold at most {most}",
        )
    if max_seconds is not None and f.frames > max_seconds * f.samplerate:
        raise TooLongAudioError(
            path, f"{f.frames / f.samplerate:.1f} s, longer than the {max_seconds:g} s allowed"
        )


def _check_complete(f: sf.SoundFile, path: str) -> None:
    # libsndfile quietly shortens a cut WAV to what is present and reports a cut Ogg as empty,
    # so truncation has to be detected from the header/log rather than from a failed read.
    if f.format in ("WAV", "WAVEX"):
        sizes = _riff_data_sizes(path)
        if sizes is not None:
            declared, present, block = sizes
            if present < declared:
                raise UnreadableAudioError(
                    path,
                    f"truncated file: header promises {declared // block} frames, "
                    f"only {max(present, 0) // block} present",
                )
    elif f.format == "OGG" and "ended unexpectedly" in f.extra_info:
        raise UnreadableAudioError(path, "truncated file: Ogg stream ends without end-of-stream page")


def audio_info(path: PathLike, max_seconds: float | None = None) -> tuple[int, int, int]:
    """``(sampling_rate, num_frames, channels)`` of a file from its header, once the claims are found
    plausible for the file's size (and within ``max_seconds``); raises the typed errors."""
    with _open(path, max_seconds) as f:
        if f.frames <= 0:
            raise EmptyAudioError(path, "file contains no samples")
        return f.samplerate, f.frames, f.channels


def decode_audio(
    path: PathLike, offset: float = 0.0, duration: float | None = None, max_seconds: float | None = None
) -> tuple[np.ndarray, int]:
    """Decode ``[offset, offset + duration)`` seconds as float32 mono at the file's own rate.

    Only the requested frames are read, in blocks of at most ``BLOCK_FRAMES``, each mixed to mono as
    it comes: memory follows the audio actually decoded, never the length a header claims. Raises on
    unreadable, unsupported, implausible, too long (``max_seconds``), empty and non-finite audio; any
    error of the decoder is an :class:`UnreadableAudioError` of this file. Silence and length are
    left to :func:`validate_waveform`.
    """
    if offset < 0 or (duration is not None and duration < 0):
        raise InputError(f"offset and duration must be >= 0, got {offset}, {duration}")
    with _open(path, max_seconds) as f:
        sr, total = f.samplerate, f.frames
        start = min(round(offset * sr), total)
        n = total - start if duration is None else min(round(duration * sr), total - start)
        if n <= 0:
            where = f" at offset {offset:g} s (file lasts {total / sr:g} s)" if start else ""
            raise EmptyAudioError(path, f"no samples{where}")
        blocks, got = [], 0
        try:
            if start:
                f.seek(start)
            while got < n:
                block = f.read(min(BLOCK_FRAMES, n - got), dtype="float32", always_2d=True)
                if not len(block):
                    break
                if not np.isfinite(block).all():
                    raise NonFiniteAudioError(path, "contains NaN/Inf samples")
                mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)
                blocks.append(np.ascontiguousarray(mono, dtype=np.float32))
                got += len(block)
        except AudioError:
            raise
        except Exception as e:
            raise UnreadableAudioError(path, f"corrupt or truncated file ({type(e).__name__}: {e})") from e
    if got < n:
        raise UnreadableAudioError(path, f"truncated file: read {got} of {n} frames")
    return (blocks[0] if len(blocks) == 1 else np.concatenate(blocks)), sr


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """High-quality (soxr HQ) resampling of a 1-D waveform; a no-op when the rates match."""
    wav = np.asarray(wav, dtype=np.float32)
    if sr_in == sr_out:
        return wav
    return soxr.resample(wav, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def validate_waveform(
    wav: np.ndarray,
    path: PathLike = "<array>",
    min_samples: int = 0,
    silence_threshold: float = DEFAULT_SILENCE_THRESHOLD,
) -> np.ndarray:
    """Raise the typed :class:`AudioError` for an unusable 1-D waveform; return it unchanged otherwise."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise AudioError(path, f"expected a 1-D mono waveform, got shape {wav.shape}")
    if wav.size == 0:
        raise EmptyAudioError(path, "contains no samples")
    if not np.isfinite(wav).all():
        raise NonFiniteAudioError(path, "contains NaN/Inf samples")
    if wav.size < min_samples:
        raise TooShortAudioError(
            path, f"{wav.size} samples, fewer than the {min_samples} required (model receptive field)"
        )
    peak = float(np.abs(wav).max())
    if peak < silence_threshold:
        raise SilentAudioError(path, f"silent: peak amplitude {peak:.2e} below {silence_threshold:g}")
    return wav


def load_audio(
    path: PathLike,
    offset: float = 0.0,
    duration: float | None = None,
    sample_rate: int = SAMPLE_RATE,
    min_samples: int = 0,
    silence_threshold: float = DEFAULT_SILENCE_THRESHOLD,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode, mix to mono, resample to ``sample_rate`` and validate; returns float32 1-D.

    ``min_samples`` counts samples at ``sample_rate`` (after resampling); a file longer than
    ``max_seconds`` is refused before it is decoded. Every failure is an :class:`AudioError`.
    """
    wav, sr = decode_audio(path, offset, duration, max_seconds)
    try:
        wav = resample(wav, sr, sample_rate)
    except Exception as e:
        raise UnreadableAudioError(path, f"cannot resample {sr} Hz to {sample_rate} Hz ({e})") from e
    return validate_waveform(wav, path, min_samples=min_samples, silence_threshold=silence_threshold)
