"""Upstream features computed once per clip and kept on disk, so several heads never recompute them.

For every clip the cache holds the per-layer time mean (float32, (D,) per state), which is all an
utterance head needs, and, when asked for, every frame of every state (float16 to halve the size),
which CTC heads need. Entries live in sharded safetensors files under
``<cache_dir>/<upstream identity>/``; a shard is written atomically once it is full, so a crash keeps
every finished shard and a rerun computes only what is missing. Under torchrun the ranks share the
encoding of what is missing (each writes shards of its own) and then all read every shard.

The upstream identity is its spec string as given (``resemblyzer?layers=all``, ``mfcc``), or for a
directory (an extracted student, a transformers checkpoint) a hash of its ``config.json`` and
``model.safetensors``: retraining a student in the same folder misses the cache. A clip's key hashes
its id, absolute path, offset, duration and sample count, so a clip changed on disk or re-cut misses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from speechmimic import distributed
from speechmimic.audio import SAMPLE_RATE, AudioError
from speechmimic.baselines import BASELINES
from speechmimic.corpus import Clip
from speechmimic.student import CONFIG_NAME, WEIGHTS_NAME
from speechmimic.upstream import load_upstream

SHARD_CLIPS = 256
SHARD_BYTES = 256 * 2**20


@dataclass
class ClipFeatures:
    """One clip's features: ``means[l]`` (D_l,) float32, ``frames[l]`` (T, D_l) float16 or None."""

    means: list[torch.Tensor]
    frames: list[torch.Tensor] | None = None


def upstream_identity(upstream: str | os.PathLike | nn.Module) -> str | None:
    """A string naming an upstream's weights, or None for a module that carries no spec."""
    if isinstance(upstream, nn.Module):
        spec = getattr(upstream, "spec", None) or getattr(getattr(upstream, "target", None), "spec", None)
        return str(spec) if spec else None
    path = Path(upstream)
    if path.is_dir() and str(upstream) not in BASELINES:  # load_upstream reads these names as specs
        h = hashlib.sha256()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if (path / name).is_file():
                with open(path / name, "rb") as fh:
                    for block in iter(lambda: fh.read(2**20), b""):
                        h.update(block)
        return f"dir:{path.resolve().name}:{h.hexdigest()[:16]}"
    return str(upstream)


def clip_key(clip: Clip) -> str:
    fields = [clip.id, os.path.abspath(clip.path), clip.offset, clip.duration, clip.num_samples]
    ident = json.dumps(fields, ensure_ascii=False)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _folder_name(identity: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", identity)[:48]
    return f"{readable}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


class FeatureStore:
    """The on-disk cache of one upstream; ``calls`` counts the clips the upstream had to encode.
    ``ledger`` records the answers of an upstream that is a target spec (see :func:`load_upstream`)."""

    def __init__(
        self,
        upstream: str | os.PathLike | nn.Module,
        cache_dir: str | os.PathLike | None = None,
        identity: str | None = None,
        device: str = "cpu",
        ledger=None,
    ):
        self.identity = identity or upstream_identity(upstream)
        self.ledger = ledger
        self._spec = upstream if not isinstance(upstream, nn.Module) else None
        self._module = upstream if isinstance(upstream, nn.Module) else None
        self.device = device
        # A module with no identity cannot be told apart from another: keep its features in memory only.
        self.root = Path(cache_dir) / _folder_name(self.identity) if cache_dir and self.identity else None
        self.calls = 0
        self.unusable: dict[str, str] = {}  # clip id -> why its audio did not decode
        self.names: list[str] | None = None
        self._memory: dict[str, ClipFeatures] = {}
        self._index: dict[str, tuple[Path, bool]] = {}  # clip key -> (shard, has frames)
        if self.root is not None:
            self._scan()

    @property
    def upstream(self) -> nn.Module:
        if self._module is None:
            self._module = load_upstream(self._spec, device=self.device, ledger=self.ledger)
        return self._module

    def _scan(self) -> None:
        for shard in sorted(self.root.glob("shard-*.safetensors")):
            with safe_open(shard, "pt") as f:
                meta = f.metadata() or {}
                self.names = self.names or json.loads(meta.get("names", "null"))
                tensor_names = list(f.keys())
            with_frames = {n.split("/")[0] for n in tensor_names if "/frames/" in n}
            for key in {n.split("/")[0] for n in tensor_names}:
                # A clip first cached without frames may have a later shard with them: prefer that one.
                if key in with_frames or key not in self._index:
                    self._index[key] = (shard, key in with_frames)

    def _read(self, keys: list[str], frames: bool) -> dict[str, ClipFeatures]:
        by_shard: dict[Path, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self._index[key][0], []).append(key)
        out = {}
        n = len(self.names)
        for shard, ks in by_shard.items():
            with safe_open(shard, "pt") as f:
                for key in ks:
                    means = [f.get_tensor(f"{key}/mean/{i}") for i in range(n)]
                    fr = [f.get_tensor(f"{key}/frames/{i}") for i in range(n)] if frames else None
                    out[key] = ClipFeatures(means, fr)
        return out

    def _encode(self, clip: Clip, frames: bool) -> ClipFeatures:
        wav = torch.from_numpy(clip.load(SAMPLE_RATE)).to(self.device)
        self.calls += 1
        with torch.no_grad():
            states = [h[0].float().cpu() for h in self.upstream([wav])["hidden_states"]]
        if self.names is None:
            default = [f"state{i}" for i in range(len(states))]
            self.names = list(getattr(self.upstream, "hidden_state_names", default))
        return ClipFeatures([s.mean(0) for s in states], [s.half() for s in states] if frames else None)

    def _write_shard(self, pending: dict[str, ClipFeatures]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for key, feats in pending.items():
            for i, m in enumerate(feats.means):
                tensors[f"{key}/mean/{i}"] = m.contiguous()
            for i, fr in enumerate(feats.frames or []):
                tensors[f"{key}/frames/{i}"] = fr.contiguous()
        number = len(list(self.root.glob("shard-*.safetensors")))
        shard = self.root / f"shard-{number:05d}-{distributed.rank()}-{os.getpid()}.safetensors"
        tmp = shard.with_suffix(".tmp")
        meta = {"identity": self.identity, "names": json.dumps(self.names)}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, shard)
        for key, feats in pending.items():
            self._index[key] = (shard, feats.frames is not None)

    def get(
        self, clips: Sequence[Clip], frames: bool = False, progress: bool = True
    ) -> list[ClipFeatures | None]:
        """Features of every clip, in order; frames only if ``frames`` (else ``ClipFeatures.frames`` is None).

        Clips are encoded one at a time (no padding can leak into a clip's features), under no_grad.
        A clip whose audio does not decode gets None and is named, with why, in :attr:`unusable`.
        """
        keys = [clip_key(c) for c in clips]
        found: dict[str, ClipFeatures] = {}
        for key in keys:
            mem = self._memory.get(key)
            if mem is not None and (mem.frames is not None or not frames):
                found[key] = mem
        on_disk = [
            k
            for k in dict.fromkeys(keys)
            if k not in found and k in self._index and (self._index[k][1] or not frames)
        ]
        found |= self._read(on_disk, frames) if on_disk else {}
        missing = {k: c for k, c in zip(keys, clips, strict=True) if k not in found}
        if self.root is None or distributed.world() == 1 or not missing:
            found |= self._encode_all(missing, frames, progress)
            return [found.get(k) for k in keys]
        # Under torchrun each rank encodes its share into shards of its own, then reads the others'.
        # Shares are cut from the request, the same on every rank, never from what a rank found on
        # disk: a rank that has already seen another's new shard would otherwise skip a clip nobody encodes.
        rank, world = distributed.rank(), distributed.world()
        mine = {k: missing[k] for k in list(dict.fromkeys(keys))[rank::world] if k in missing}
        found |= self._encode_all(mine, frames, progress and rank == 0)
        distributed.barrier()
        self.unusable = distributed.merged(self.unusable)
        self._scan()
        found |= self._read([k for k in missing if k not in found and k in self._index], frames)
        return [found.get(k) for k in keys]

    def _encode_all(self, missing: dict[str, Clip], frames: bool, progress: bool) -> dict[str, ClipFeatures]:
        found: dict[str, ClipFeatures] = {}
        pending: dict[str, ClipFeatures] = {}
        size = 0
        for key, clip in tqdm(missing.items(), desc="upstream features", unit="clip", disable=not progress):
            try:
                feats = self._encode(clip, frames)
            except AudioError as e:
                self.unusable[clip.id] = e.reason
                continue
            found[key] = feats
            if self.root is None:
                self._memory[key] = feats
                continue
            pending[key] = feats
            size += sum(t.numel() * t.element_size() for t in feats.means + (feats.frames or []))
            if len(pending) >= SHARD_CLIPS or size >= SHARD_BYTES:
                self._write_shard(pending)
                pending, size = {}, 0
        if pending:
            self._write_shard(pending)
        return found
