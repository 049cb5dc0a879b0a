"""A thief's several API keys (sybils) as one target.

Per-key defences see each key alone: a key that asks a quarter of the clips covers a quarter of the
space (B4B) and looks like a quarter of the traffic; per-key transforms put each key's answers in
its own coordinates. :class:`Sybils` asks the first ``anchors`` clips through every key, fits per
key and layer a least-squares affine map from that key's answers to the first key's (frames of one
clip align: the same target answered them), then sends each later clip through the keys in turn
and returns its answer mapped into the first key's coordinates. The anchors' answers are kept in
``store`` (an ``.npz``), so a resumed attack refits the maps without paying for them again; what the
anchors cost beyond one key is :attr:`extra_seconds`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from speechmimic.errors import InputError
from speechmimic.targets import Target
from speechmimic.targets.base import PartialAnswers

SAMPLE_RATE = 16_000


class Sybils:
    def __init__(self, keys: list[Target], anchors: int = 8, store: str | Path | None = None):
        if len(keys) < 2:
            raise InputError("sybils need at least two keys")
        if anchors < 1:
            raise InputError("sybils need at least one anchor clip to fit the maps")
        self.keys = keys
        self.anchors = anchors
        self.store = Path(store) if store is not None else None
        first = keys[0]
        self.spec = "sybils:" + " + ".join(k.spec for k in keys)
        self.frame_rate, self.layers, self.padding = first.frame_rate, first.layers, first.padding
        self.min_samples = max(k.min_samples for k in keys)
        # anchor answers: per key, per layer, the frames of every anchor clip stacked
        self._frames: list[dict[str, list[np.ndarray]]] = [{} for _ in keys]
        self._anchored = 0
        self._maps: list[dict[str, np.ndarray]] | None = None
        self._turn = 0
        self.extra_seconds = 0.0
        if self.store is not None and self.store.exists():
            self._load()

    def _load(self) -> None:
        with np.load(self.store) as z:
            self._anchored = int(z["anchored"])
            self.extra_seconds = float(z["extra_seconds"])
            for name in z.files:
                if name.startswith("k"):
                    j, layer = name[1:].split("/", 1)
                    self._frames[int(j)][layer] = [z[name]]
        if self._anchored >= self.anchors:
            self._fit()

    def _save(self) -> None:
        if self.store is None:
            return
        arrays = {
            f"k{j}/{layer}": np.concatenate(frames)
            for j, per in enumerate(self._frames)
            for layer, frames in per.items()
        }
        self.store.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.store.with_name(self.store.name + ".tmp.npz")
        np.savez(tmp, anchored=self._anchored, extra_seconds=self.extra_seconds, **arrays)
        tmp.replace(self.store)

    def _fit(self) -> None:
        maps = []
        for j in range(len(self.keys)):
            per = {}
            for layer, frames in self._frames[0].items():
                y = np.concatenate(frames)
                x = np.concatenate(self._frames[j][layer])
                x1 = np.hstack([x, np.ones((len(x), 1), x.dtype)])
                per[layer] = np.linalg.lstsq(x1, y, rcond=None)[0].astype(np.float32)
            maps.append(per)
        self._maps = maps

    def _mapped(self, j: int, answer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if j == 0:
            return answer
        return {
            layer: (np.hstack([a, np.ones((len(a), 1), np.float32)]) @ self._maps[j][layer]).astype(
                np.float32
            )
            for layer, a in answer.items()
        }

    def __call__(self, wavs: list[np.ndarray], keys: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        out: list[dict[str, np.ndarray] | None] = []
        errors = {}
        for i, wav in enumerate(wavs):
            try:
                out.append(self._answer(wav, [keys[i]] if keys is not None else None))
            except PartialAnswers as e:  # every key refused this clip: its failure, not the batch's
                out.append(None)
                errors[i] = e.errors[0]
        if errors:
            raise PartialAnswers(out, errors)
        return out

    def _answer(self, wav: np.ndarray, ikeys: list[str] | None) -> dict[str, np.ndarray]:
        if self._maps is None:  # an anchor: asked through every key
            answers = [self.keys[0]([wav], keys=ikeys)[0]]
            try:
                for k in self.keys[1:]:
                    answers.append(k([wav], keys=ikeys)[0])
            except PartialAnswers:  # a key refused it: no anchor, but the first key's answer stands
                return answers[0]
            finally:
                self.extra_seconds += (len(answers) - 1) * len(wav) / SAMPLE_RATE
            for j, answer in enumerate(answers):
                for layer, frames in answer.items():
                    self._frames[j].setdefault(layer, []).append(np.asarray(frames, np.float32))
            self._anchored += 1
            if self._anchored >= self.anchors:
                self._fit()
            self._save()
            return answers[0]
        # the keys in turn; a key that refuses (flagged, out of quota) passes the clip to the next
        first = self._turn % len(self.keys)
        self._turn += 1
        for step in range(len(self.keys)):
            j = (first + step) % len(self.keys)
            try:
                return self._mapped(j, self.keys[j]([wav], keys=ikeys)[0])
            except PartialAnswers as e:
                refused = e
        raise refused
