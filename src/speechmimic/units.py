"""Stage-1 targets: frame features -> k-means units -> one unit per student frame.

Iteration 1 clusters MFCCs (13 + deltas + delta-deltas, per-utterance CMVN, 100 Hz); iteration 2
clusters a hidden layer of the iteration-1 student (at the student's own rate). k-means is fitted on a
seeded sample of at most ``max_frames`` frames, so memory stays bounded whatever the corpus size.

Every product is a file whose name carries a hash of its inputs (clips, feature source including
model weights, k, seed, sample size), written in parts of ``CHUNK`` clips: a rerun skips what exists,
and an interrupted pass restarts at the first missing part.

Alignment (:func:`labels_for_student`) is the one place label frames meet student frames.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from speechmimic.audio import SAMPLE_RATE, AudioError
from speechmimic.baselines import MFCCUpstream
from speechmimic.corpus import Clip, clips_fingerprint, fingerprint
from speechmimic.dsp import HOP as MFCC_HOP
from speechmimic.errors import InputError
from speechmimic.student import Student, StudentConfig

CHUNK = 256  # clips per part file: the unit of resumption
MIN_SAMPLES = 400  # one 25 ms window (and the waveform CNN's receptive field); shorter clips are rejected


def student_fingerprint(student: Student) -> str:
    """Hash of a student's config and weights."""
    h = hashlib.sha256(json.dumps(student.cfg.to_dict(), sort_keys=True).encode())
    for k, v in sorted(student.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def frame_centre_offset(cfg: StudentConfig) -> float:
    """Sample at which student frame 0 is centred (frame j: ``j * cfg.hop`` later).

    fbank: a centred STFT puts mel frame i at ``i * 160``; the stride-2 conv (kernel 3, padding 1)
    centres student frame j on mel frame 2j, i.e. sample ``j * hop``. Waveform CNN: frame j reads
    samples ``[j * hop, j * hop + rf)``, centre ``j * hop + (rf - 1) / 2``.
    """
    return 0.0 if cfg.frontend == "fbank" else (cfg.min_samples - 1) / 2


def labels_for_student(
    labels: np.ndarray,
    num_samples: int,
    cfg: StudentConfig,
    label_hop: int = MFCC_HOP,
    label_offset: float = 0.0,
) -> np.ndarray:
    """Labels of one clip resampled to its ``cfg.num_frames(num_samples)`` student frames.

    Label frame i is centred at sample ``i * label_hop + label_offset``, student frame j at
    ``c_j = j * cfg.hop + frame_centre_offset(cfg)``; frame j takes the nearest label,
    ``i_j = clip(floor((c_j - label_offset) / label_hop + 1/2), 0, len(labels) - 1)``. Labels already
    at the student's rate (``label_hop = cfg.hop``, same offset) map one to one.
    """
    n = max(0, int(cfg.num_frames(num_samples)))
    if n and not len(labels):
        raise ValueError("no labels to align")
    centres = np.arange(n) * cfg.hop + frame_centre_offset(cfg)
    idx = np.floor((centres - label_offset) / label_hop + 0.5).astype(np.int64)
    return np.asarray(labels)[np.clip(idx, 0, max(0, len(labels) - 1))]


# -- feature sources -----------------------------------------------------------------------------------


class MFCCSource:
    """39-d MFCC + deltas with per-utterance CMVN, one frame per 10 ms (centred windows)."""

    hop = MFCC_HOP
    offset = 0.0

    def __init__(self):
        self.upstream = MFCCUpstream(cmvn=True)

    def describe(self, base: Path | None = None) -> dict:
        return {"kind": "mfcc+cmvn"}

    def fingerprint(self) -> str:
        return "mfcc+cmvn"

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        return self.upstream([torch.from_numpy(wav)])["hidden_states"][0][0].numpy()


class StudentSource:
    """Hidden state ``layer`` (0 = front end, i = after block i) of a student, at the student's rate."""

    def __init__(self, student: Student, layer: int, device: str = "cpu", directory: Path | None = None):
        self.student = student.to(device).eval()
        self.layer = layer
        self.device = device
        self.directory = directory
        self.hop = student.cfg.hop
        self.offset = frame_centre_offset(student.cfg)
        self._fingerprint = f"student-{student_fingerprint(student)}-layer{layer}"

    def describe(self, base: Path | None = None) -> dict:
        if self.directory is None:
            raise ValueError("a student source saved with a checkpoint needs the student's folder")
        path = os.path.relpath(self.directory, base) if base is not None else str(self.directory)
        return {"kind": "student", "dir": path, "layer": self.layer}

    def fingerprint(self) -> str:
        return self._fingerprint

    @torch.no_grad()
    def __call__(self, wav: np.ndarray) -> np.ndarray:
        states, _ = self.student.encode(torch.from_numpy(wav)[None].to(self.device))
        n = int(self.student.cfg.num_frames(len(wav)))
        return states[self.layer][0, :n].float().cpu().numpy()


def source_from_dict(d: dict, base: Path, device: str = "cpu"):
    if d["kind"] == "mfcc+cmvn":
        return MFCCSource()
    if d["kind"] == "student":
        directory = (base / d["dir"]).resolve()
        student, _ = Student.load(directory)
        return StudentSource(student, int(d["layer"]), device, directory)
    raise InputError(f"unknown feature source {d['kind']!r}")


# -- chunked, hash-named, resumable passes over clips ----------------------------------------------------


def _map_parts(clips: list[Clip], fn, directory: Path, desc: str, progress: bool) -> list[dict]:
    """``fn(part_index, clips of the part, bar) -> dict of arrays`` over parts of CHUNK clips, each saved
    as ``directory/part-NNNNN.npz``; parts already on disk are read back, not recomputed."""
    directory.mkdir(parents=True, exist_ok=True)
    n_parts = (len(clips) + CHUNK - 1) // CHUNK
    paths = [directory / f"part-{i:05d}.npz" for i in range(n_parts)]
    done = sum(min(CHUNK, len(clips) - i * CHUNK) for i, p in enumerate(paths) if p.exists())
    bar = tqdm(total=len(clips), initial=done, desc=desc, unit="clip", disable=not progress)
    out = []
    for i, path in enumerate(paths):
        if not path.exists():
            arrays = fn(i, clips[i * CHUNK : (i + 1) * CHUNK], bar)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            tmp.replace(path)
        with np.load(path) as f:
            out.append({k: f[k] for k in f.files})
    bar.close()
    return out


@dataclass
class Units:
    """k-means centroids over the frames of a feature source."""

    source: MFCCSource | StudentSource
    centroids: np.ndarray  # (k, D) float32
    # clip id -> why it could not be labelled (it does not decode); filled by clip_labels
    unusable: dict[str, str] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.centroids)

    def fingerprint(self) -> str:
        return fingerprint(self.source.fingerprint(), self.centroids.astype(np.float32).tobytes())

    def assign(self, feats: np.ndarray) -> np.ndarray:
        """Nearest centroid of each (T, D) frame."""
        c = torch.from_numpy(self.centroids)
        x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
        d = (c * c).sum(1)[None] - 2 * x @ c.T  # |x|^2 is the same for every centroid
        return d.argmin(1).numpy().astype(np.int16)

    def clip_labels(
        self, clips: list[Clip], cache_dir: str | Path | None = None, progress: bool = True
    ) -> dict[str, tuple[np.ndarray, int]]:
        """Units of each clip at the source's rate, with the clip's samples at 16 kHz; cached under
        ``cache_dir`` when given. A clip that does not decode gets none and is named, with why, in
        :attr:`unusable`."""

        def run(_, part, bar):
            ids, labels, samples, bad, reasons = [], [], [], [], []
            for clip in part:
                bar.update(1)
                try:
                    wav = clip.load(min_samples=MIN_SAMPLES)
                except AudioError as e:
                    bad.append(clip.id)
                    reasons.append(e.reason)
                    continue
                ids.append(clip.id)
                labels.append(self.assign(self.source(wav)))
                samples.append(len(wav))
            return {
                "ids": np.array(ids, dtype=str),
                "samples": np.array(samples, dtype=np.int64),
                "lengths": np.array([len(x) for x in labels], dtype=np.int64),
                "labels": np.concatenate(labels) if labels else np.zeros(0, np.int16),
                "unusable_ids": np.array(bad, dtype=str),
                "unusable_reasons": np.array(reasons, dtype=str),
            }

        if cache_dir is None:
            parts = [run(0, clips, tqdm(total=len(clips), desc="units", unit="clip", disable=not progress))]
        else:
            key = fingerprint(clips_fingerprint(clips), self.fingerprint())
            directory = Path(cache_dir) / f"labels-{key}"
            parts = _map_parts(clips, run, directory, "units", progress)
        out = {}
        for part in parts:
            for clip_id, reason in zip(
                part.get("unusable_ids", ()), part.get("unusable_reasons", ()), strict=True
            ):
                self.unusable[str(clip_id)] = str(reason)
            ends = np.cumsum(part["lengths"])
            for clip_id, n, a, b in zip(
                part["ids"], part["samples"], ends - part["lengths"], ends, strict=True
            ):
                out[str(clip_id)] = (part["labels"][a:b], int(n))
        return out

    def labels_of(self, wav: np.ndarray, cfg: StudentConfig) -> np.ndarray:
        """The units of one 16 kHz waveform, one per student frame, int16 (as :meth:`student_labels`)."""
        return labels_for_student(
            self.assign(self.source(wav)), len(wav), cfg, self.source.hop, self.source.offset
        )

    def student_labels(
        self,
        clips: list[Clip],
        cfg: StudentConfig,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> dict[str, np.ndarray]:
        """Units of each clip, one per student frame (see :func:`labels_for_student`); int16, as
        :meth:`assign` gives them, so a large corpus's labels take a quarter of int64's memory."""
        raw = self.clip_labels(clips, cache_dir, progress)
        return {
            clip_id: labels_for_student(labels, n, cfg, self.source.hop, self.source.offset)
            for clip_id, (labels, n) in raw.items()
        }


def fit_units(
    clips: list[Clip],
    source: MFCCSource | StudentSource,
    k: int,
    seed: int,
    cache_dir: str | Path,
    max_frames: int = 200_000,
    progress: bool = True,
) -> Units:
    """k-means (scikit-learn MiniBatchKMeans) on a seeded sample of at most ~``max_frames`` frames."""
    from sklearn.cluster import MiniBatchKMeans

    cache_dir = Path(cache_dir)
    key = fingerprint(clips_fingerprint(clips), source.fingerprint(), k, seed, max_frames)
    path = cache_dir / f"kmeans-{key}.safetensors"
    if path.exists():
        return Units(source, load_file(path)["centroids"].numpy())
    total = sum(int(c.duration * SAMPLE_RATE) // source.hop + 1 for c in clips)
    keep = min(1.0, max_frames / max(1, total))

    def run(i, part, bar):
        rng = np.random.default_rng([seed, i])  # per part, so a resumed pass draws the same sample
        frames = []
        for clip in part:
            bar.update(1)
            try:
                feats = source(clip.load(min_samples=MIN_SAMPLES))
            except AudioError:
                continue  # named by the labelling pass, which meets the same clip
            frames.append(feats[rng.random(len(feats)) < keep])
        return {
            "frames": np.concatenate(frames).astype(np.float32) if frames else np.zeros((0, 0), np.float32)
        }

    parts = _map_parts(clips, run, cache_dir / f"sample-{key}", "k-means sample", progress)
    found = [p["frames"] for p in parts if len(p["frames"])]
    sample = np.concatenate(found) if found else np.zeros((0, 1), np.float32)
    if len(sample) < k:
        raise InputError(f"{len(sample)} sampled frames cannot make {k} clusters")
    km = MiniBatchKMeans(
        n_clusters=k, random_state=seed, batch_size=10_000, n_init=3, max_iter=100, max_no_improvement=20
    ).fit(sample)
    centroids = km.cluster_centers_.astype(np.float32)
    tmp = path.with_suffix(".tmp")
    save_file({"centroids": torch.from_numpy(centroids)}, tmp)
    tmp.replace(path)
    return Units(source, centroids)
