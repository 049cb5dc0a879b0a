"""Corpus manifests (JSONL, one :class:`Clip` per line) and scanners for common dataset layouts.

Layouts understood by :func:`scan`:

``librispeech``
    ``<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`` with ``<spk>-<chapter>.trans.txt`` beside the
    audio, or the flat ``<spk>/<spk>-<chapter>-<utt>.flac``. Labels ``speaker``, ``chapter`` and
    ``text`` (when a transcript line exists). Id: the utterance id.
``speech_commands``
    ``<word>/<hash>_nohash_<n>.wav`` with ``testing_list.txt`` / ``validation_list.txt`` at the
    root. Labels ``word``, ``speaker`` (the hash) and ``split`` (train/validation/test). The
    ``_background_noise_`` folder holds long noise recordings, not utterances: its files are
    listed in ``skipped``. Id: ``<word>-<hash>_nohash_<n>``.
``fsdd``
    ``{digit}_{speaker}_{index}.wav`` anywhere below the root (usually ``recordings/``). Labels
    ``digit`` (int), ``speaker``, ``index`` (int) and ``split`` (``test`` for index 0-4, the usual
    split, else ``train``). Id: the file stem.
``plain``
    Every audio file; labels ``{"folder": <parent folder>}``, or ``{}`` for files at the root.
    Id: the relative path without extension, ``/`` replaced by ``-``.

Auto-detection picks the first of speech_commands, fsdd, librispeech whose naming every audio
file follows, else plain. With a forced layout, files that do not follow its naming are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from speechmimic.audio import (
    AUDIO_EXTENSIONS,
    DEFAULT_SILENCE_THRESHOLD,
    SAMPLE_RATE,
    AudioError,
    SilentAudioError,
    TooShortAudioError,
    audio_info,
    decode_audio,
    load_audio,
    resample,
    validate_waveform,
)
from speechmimic.errors import InputError

LAYOUTS = ("plain", "librispeech", "speech_commands", "fsdd")

_LIBRI_RE = re.compile(r"^(\d+)-(\d+)-(\d+)$")
_SC_RE = re.compile(r"^([0-9a-f]+)_nohash_(\d+)$", re.IGNORECASE)
_FSDD_RE = re.compile(r"^(\d)_(.+)_(\d+)$")
_SC_NOISE_DIR = "_background_noise_"


@dataclass(slots=True)
class Clip:
    """One utterance, or one segment of a file.

    ``sampling_rate`` and ``num_samples`` describe the segment at the source file's rate;
    ``offset`` and ``duration`` are in seconds.
    """

    id: str
    path: str
    sampling_rate: int
    num_samples: int
    duration: float
    offset: float = 0.0
    labels: dict = field(default_factory=dict)

    def load(self, sample_rate: int = SAMPLE_RATE, min_samples: int = 0) -> np.ndarray:
        """The clip as validated float32 mono at ``sample_rate``."""
        return load_audio(
            self.path,
            offset=self.offset,
            duration=self.duration,
            sample_rate=sample_rate,
            min_samples=min_samples,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Clip:
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.name not in ("offset", "labels")}
        if missing := required - d.keys():
            raise ValueError(f"missing keys {sorted(missing)}")
        if unknown := d.keys() - names:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        return cls(
            id=str(d["id"]),
            path=str(d["path"]),
            sampling_rate=int(d["sampling_rate"]),
            num_samples=int(d["num_samples"]),
            duration=float(d["duration"]),
            offset=float(d.get("offset", 0.0)),
            labels=dict(d.get("labels") or {}),
        )


@dataclass
class ScanResult:
    clips: list[Clip]
    skipped: list[tuple[str, str]]  # (path, reason); segment paths carry an "@k" suffix
    layout: str

    @property
    def hours(self) -> float:
        return sum(c.duration for c in self.clips) / 3600.0


# ---------------------------------------------------------------- manifests


def write_manifest(clips: Iterable[Clip], path: str | os.PathLike) -> None:
    """Write clips as JSONL atomically; paths under the manifest's folder are stored relative to it."""
    out = Path(path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    base = str(out.parent.resolve())
    fd, tmp = tempfile.mkstemp(dir=base, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for clip in clips:
                d = clip.to_dict()
                audio = os.path.realpath(clip.path)  # strings, not Paths: see iter_manifest
                inside = os.path.commonpath([audio, base]) == base
                d["path"] = os.path.relpath(audio, base).replace(os.sep, "/") if inside else audio
                fh.write(json.dumps(d, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def iter_manifest(path: str | os.PathLike) -> Iterator[Clip]:
    """Lazily yield the clips of a JSONL manifest, with paths resolved against its folder."""
    path = Path(path)
    # A string, not a Path: pathlib interns every path part it parses, so a Path per clip would keep
    # every file name of a streamed manifest alive for the life of the process.
    base = str(path.absolute().parent)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if not isinstance(d, dict):
                    raise ValueError("not a JSON object")
                clip = Clip.from_dict(d)
            except (ValueError, TypeError) as e:
                raise InputError(f"{path}:{lineno}: malformed manifest line: {e}") from e
            clip.path = os.path.normpath(os.path.join(base, clip.path))
            yield clip


def count_manifest(path: str | os.PathLike) -> int:
    """How many clips a manifest holds (its non-blank lines), without parsing them."""
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def read_manifest(path: str | os.PathLike) -> list[Clip]:
    return list(iter_manifest(path))


def warn_unusable(step: str, unusable: dict[str, str], shown: int = 5) -> None:
    """Say on stderr which clips ``step`` skipped and why: a bad file is its own failure, not the run's."""
    if not unusable:
        return
    items = list(unusable.items())
    listed = "; ".join(f"{clip_id}: {reason}" for clip_id, reason in items[:shown])
    more = f"; and {len(items) - shown} more" if len(items) > shown else ""
    print(f"{step}: skipped {len(items)} unusable clip(s): {listed}{more}", file=sys.stderr, flush=True)


def fingerprint(*parts) -> str:
    """A short hash of JSON-able values and bytes: the names of cached products carry their inputs'."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()[:16]


def clips_fingerprint(clips: list[Clip]) -> str:
    """Hash of a manifest's content: which audio, which segment, in which order."""
    return fingerprint([[c.id, c.path, c.offset, c.duration, c.num_samples] for c in clips])


def hold_out_by_source(clips: list[Clip], share: float, seed: int = 0) -> tuple[list[Clip], list[Clip]]:
    """(kept, held out): whole source files, in a seeded random order, are held out until they
    hold ``share`` of the seconds, so no held-out second has a neighbouring segment on the other side."""
    by_file: dict[str, list[Clip]] = {}
    for c in clips:
        by_file.setdefault(c.path, []).append(c)
    files = sorted(by_file)
    random.Random(seed).shuffle(files)
    total, held, held_files = sum(c.duration for c in clips), 0.0, set()
    for f in files:
        if held >= share * total:
            break
        held_files.add(f)
        held += sum(c.duration for c in by_file[f])
    return [c for c in clips if c.path not in held_files], [c for c in clips if c.path in held_files]


def random_crops(clips: list[Clip], seconds: float, per_clip: int, seed: int = 0) -> list[Clip]:
    """``per_clip`` crops of ``seconds`` at seeded random places in each clip at least that long, ids
    ``<id>#<k>``, labelled as their clip plus ``utterance: <id>`` (so probes can keep crops of one
    recording together)."""
    rng = random.Random(seed)
    crops = []
    for clip in clips:
        n = int(seconds * clip.sampling_rate)
        if clip.num_samples < n:
            continue
        for k in range(per_clip):
            start = rng.randrange(0, clip.num_samples - n + 1)
            labels = {**clip.labels, "utterance": clip.id}
            offset = clip.offset + start / clip.sampling_rate
            crops.append(
                Clip(
                    f"{clip.id}#{k}", clip.path, clip.sampling_rate, n, n / clip.sampling_rate, offset, labels
                )
            )
    return crops


# ---------------------------------------------------------------- layouts


def _match_librispeech(rel: Path) -> bool:
    m = _LIBRI_RE.match(rel.stem)
    if not m:
        return False
    parents = rel.parent.parts
    spk, chapter = m.group(1), m.group(2)
    return parents[-2:] == (spk, chapter) or parents[-1:] == (spk,)


def _match_speech_commands(rel: Path) -> bool:
    return len(rel.parts) >= 2 and (rel.parts[0] == _SC_NOISE_DIR or bool(_SC_RE.match(rel.stem)))


def _match_fsdd(rel: Path) -> bool:
    return bool(_FSDD_RE.match(rel.stem))


_MATCHERS = {
    "speech_commands": _match_speech_commands,
    "fsdd": _match_fsdd,
    "librispeech": _match_librispeech,
}


def detect_layout(rel_paths: list[Path]) -> str:
    if rel_paths:
        for name, match in _MATCHERS.items():
            if all(match(p) for p in rel_paths):
                return name
    return "plain"


def _read_lines(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


class _Labeller:
    """Per-layout ids and labels; raises ValueError for files that are not utterances of the layout."""

    def __init__(self, root: Path, layout: str):
        self.root = root
        self.layout = layout
        self._transcripts: dict[Path, dict[str, str]] = {}
        if layout == "speech_commands":
            self._test = _read_lines(root / "testing_list.txt")
            self._valid = _read_lines(root / "validation_list.txt")

    def _transcript(self, folder: Path) -> dict[str, str]:
        if folder not in self._transcripts:
            texts = {}
            for trans in sorted(folder.glob("*.trans.txt")):
                for line in trans.read_text(encoding="utf-8").splitlines():
                    utt, _, text = line.strip().partition(" ")
                    if utt:
                        texts[utt] = text.strip()
            self._transcripts[folder] = texts
        return self._transcripts[folder]

    def __call__(self, rel: Path) -> tuple[str, dict]:
        if self.layout == "librispeech":
            if not _match_librispeech(rel):
                raise ValueError("name does not follow <spk>/[<chapter>/]<spk>-<chapter>-<utt>.<ext>")
            utt = rel.stem
            spk, chapter, _ = utt.split("-")
            labels = {"speaker": spk, "chapter": chapter}
            text = self._transcript(self.root / rel.parent).get(utt)
            if text is not None:
                labels["text"] = text
            return utt, labels
        if self.layout == "speech_commands":
            if rel.parts[0] == _SC_NOISE_DIR:
                raise ValueError("background noise recording, not an utterance")
            m = _SC_RE.match(rel.stem)
            if not m or len(rel.parts) < 2:
                raise ValueError("name does not follow <word>/<hash>_nohash_<n>.<ext>")
            word = rel.parent.name
            key = f"{word}/{rel.name}"
            split = "test" if key in self._test else "validation" if key in self._valid else "train"
            return f"{word}-{rel.stem}", {"word": word, "speaker": m.group(1), "split": split}
        if self.layout == "fsdd":
            m = _FSDD_RE.match(rel.stem)
            if not m:
                raise ValueError("name does not follow {digit}_{speaker}_{index}.<ext>")
            index = int(m.group(3))
            labels = {
                "digit": int(m.group(1)),
                "speaker": m.group(2),
                "index": index,
                "split": "test" if index < 5 else "train",
            }
            return rel.stem, labels
        labels = {"folder": rel.parent.name} if len(rel.parts) > 1 else {}
        return rel.with_suffix("").as_posix().replace("/", "-"), labels


# ---------------------------------------------------------------- scanning


def _segment_bounds(num_samples: int, sr: int, max_seconds: float | None) -> list[tuple[int, int]]:
    """Equal-length consecutive segments of at most ``max_seconds``; drops < n_segments tail samples."""
    if max_seconds is None or num_samples <= max_seconds * sr:
        return [(0, num_samples)]
    max_len = max(1, math.floor(max_seconds * sr))
    count = math.ceil(num_samples / max_len)
    seg = num_samples // count
    return [(k * seg, seg) for k in range(count)]


def scan(
    root: str | os.PathLike,
    layout: str = "auto",
    max_segment_seconds: float | None = None,
    min_samples: int = 0,
    progress: bool = True,
    silence_threshold: float = DEFAULT_SILENCE_THRESHOLD,
    max_file_seconds: float | None = None,
    workers: int = 1,
) -> ScanResult:
    """Find, decode and validate every audio file under ``root``; bad files are skipped, never fatal,
    and so are folders that cannot be read, dangling links and links to folders, each with why.
    ``workers`` > 1 decodes files in that many processes; the result is the same, in the same order.

    ``min_samples`` counts samples at 16 kHz. With ``max_segment_seconds``, longer files become
    segments ``<id>@<k>`` (label ``segment: k``), each decoded and validated on its own (a long file
    is never decoded whole). Files longer than
    ``max_file_seconds`` are skipped before they are decoded.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    if layout != "auto" and layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose auto or one of {', '.join(LAYOUTS)}")
    if max_segment_seconds is not None and max_segment_seconds <= 0:
        raise InputError(f"max_segment_seconds must be > 0, got {max_segment_seconds}")
    root = root.resolve()

    files, skipped = _audio_files(root)
    rel_paths = sorted((p.relative_to(root) for p in files), key=lambda p: p.as_posix())
    del files  # per-file lists are most of a large scan's memory: keep one at a time
    if layout == "auto":
        layout = detect_layout(rel_paths)
    labeller = _Labeller(root, layout)

    # (path, id, labels) or (path, why not), in file order; paths as the strings the clips keep
    named: list[tuple[str, str, dict] | tuple[str, str]] = []
    for rel in rel_paths:
        path = str(root / rel)
        try:
            named.append((path, *labeller(rel)))
        except ValueError as e:
            named.append((path, str(e)))
    del rel_paths
    check = functools.partial(
        _check_file,
        max_segment_seconds=max_segment_seconds,
        min_samples=min_samples,
        silence_threshold=silence_threshold,
        max_file_seconds=max_file_seconds,
    )
    paths = [entry[0] for entry in named if len(entry) == 3]
    clips: list[Clip] = []
    seen_ids: set[str] = set()
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(paths) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=_worker_context()))
            results = pool.map(check, paths, chunksize=max(1, min(64, len(paths) // (4 * workers))))
        else:
            results = map(check, paths)
        results = iter(
            tqdm(results, total=len(paths), desc=f"scanning {root.name}", unit="file", disable=not progress)
        )
        for entry in named:  # in file order, whatever order the workers finish in
            if len(entry) == 2:
                skipped.append(entry)
                continue
            path, clip_id, labels = entry
            sr, segments, problems = next(results)
            skipped.extend(problems)
            if sr is None:
                continue
            clip_id = _unique(clip_id, path, seen_ids)
            for k, start, n, whole in segments:
                if whole:
                    clips.append(Clip(clip_id, path, sr, n, n / sr, 0.0, labels))
                else:
                    clips.append(
                        Clip(f"{clip_id}@{k}", path, sr, n, n / sr, start / sr, {**labels, "segment": k})
                    )
    return ScanResult(clips=clips, skipped=skipped, layout=layout)


def _check_file(
    path: str,
    max_segment_seconds: float | None,
    min_samples: int,
    silence_threshold: float,
    max_file_seconds: float | None,
) -> tuple[int | None, list[tuple[int, int, int, bool]], list[tuple[str, str]]]:
    """Decode and validate one file (in a worker process, perhaps): its sample rate (None when the
    file is unusable), its usable segments ``(k, start, frames, whole file)`` and what was skipped.

    A file to be cut into segments is decoded one segment at a time, so a scan's memory follows the
    segment length, not the file's. A file that does not decode (corrupt, truncated, NaN) is unusable
    whole, however it was read; a segment that is silent or too short is skipped alone."""
    try:
        if max_segment_seconds is None:
            wav, sr = decode_audio(path, max_seconds=max_file_seconds)
            validate_waveform(wav, path, silence_threshold=silence_threshold)
            bounds = [(0, len(wav))]
        else:
            sr, frames, _ = audio_info(path, max_seconds=max_file_seconds)
            bounds = _segment_bounds(frames, sr, max_segment_seconds)
        segments, skipped, kinds = [], [], set()
        for k, (start, n) in enumerate(bounds):
            seg_path = f"{path}@{k}" if len(bounds) > 1 else path
            try:
                if max_segment_seconds is not None:
                    wav, _ = decode_audio(path, offset=start / sr, duration=n / sr)
                    n = len(wav)
                seg = wav if max_segment_seconds is not None else wav[start : start + n]
                validate_waveform(
                    resample(seg, sr, SAMPLE_RATE), seg_path, min_samples=min_samples,
                    silence_threshold=silence_threshold,
                )  # fmt: skip
            except (SilentAudioError, TooShortAudioError) as e:  # that segment's, not the file's
                skipped.append((seg_path, e.reason))
                kinds.add(type(e))
                continue
            segments.append((k, start, n, len(bounds) == 1))
    except AudioError as e:
        return None, [], [(path, e.reason)]
    except Exception as e:  # never the scan's failure: the decoder types its errors, this is the net
        return None, [], [(path, f"unexpected error while decoding ({type(e).__name__}: {e})")]
    if len(bounds) > 1 and not segments and len(kinds) == 1:
        return None, [], [(path, skipped[0][1])]  # e.g. silent throughout: say it once, of the file
    return sr, segments, skipped


def _worker_context():
    # fork is fastest, but forking a process that runs torch's threads can deadlock
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _audio_files(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The audio files under ``root``, and (path, reason) for what could hold audio yet cannot be
    scanned: a folder that cannot be listed, a dangling link (to a file or a folder: its name does
    not say), a link to a folder (not followed: it may loop or repeat the tree)."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []

    def unlistable(e: OSError) -> None:
        skipped.append((e.filename, f"folder cannot be read ({e.strerror}): its files are not scanned"))

    for folder, dirs, names in os.walk(root, onerror=unlistable):
        for name in dirs:
            if os.path.islink(os.path.join(folder, name)):
                link = os.path.join(folder, name)
                reason = f"link to a folder ({os.readlink(link)}), not followed: scan that folder"
                skipped.append((link, reason))
        for name in names:
            path = Path(folder, name)
            if path.is_symlink() and not path.exists():
                skipped.append((str(path), f"dangling link: its target {os.readlink(path)} does not exist"))
            elif path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
                files.append(path)
    return files, sorted(skipped)


def _unique(clip_id: str, path: str, seen: set[str]) -> str:
    # Same stem with two extensions, or "a-b/c" vs "a/b-c" in plain trees, would collide.
    candidate = clip_id
    if candidate in seen:
        candidate = f"{clip_id}{os.path.splitext(path)[1].lower()}"
    n = 1
    while candidate in seen:
        n += 1
        candidate = f"{clip_id}#{n}"
    seen.add(candidate)
    return candidate
