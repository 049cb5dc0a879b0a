"""Any transformers audio encoder with hidden states (HuBERT, WavLM, wav2vec 2.0, data2vec-audio)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from speechmimic.audio import SAMPLE_RATE
from speechmimic.errors import InputError
from speechmimic.targets.base import as_clip, parse_layers

PADDINGS = ("per_clip", "bucket")
# A hub repo id, 'name' or 'namespace/name' (the hub's rule, less its limits on length and '--').
HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")
# Clips whose lengths differ by at most this fraction share a padded batch in bucket mode.
_BUCKET_TOLERANCE = 0.05


class HFTarget:
    """A transformers speech encoder exposed as a :class:`~speechmimic.targets.base.Target`.

    With ``output_hidden_states=True`` the model yields ``L + 1`` hidden states: index 0 is the
    projected CNN features entering the transformer, index ``L`` the last layer. ``layers`` picks
    indices into that list (default: the last only); each is returned as ``hidden_<i>`` with ``i``
    non-negative. Frames come at ``16000 / prod(conv_stride)`` Hz (50 Hz for the usual models).

    Input normalisation mirrors the checkpoint's feature extractor: each clip is scaled to zero mean
    and unit variance when its ``preprocessor_config.json`` says ``do_normalize: true``; without a
    preprocessor config the rule falls back to ``config.feat_extract_norm == "layer"``, because
    the checkpoints trained with normalised input (e.g. wav2vec 2.0 large-lv60, HuBERT large, WavLM large) are
    the layer-norm ones while the group-norm base models were trained on raw waveforms.

    Padding changes the outputs of these models: the group-norm CNN of base models normalises over
    the whole padded length, and models trained without an attention mask also attend to the
    padded frames. Even with an attention mask the results are not bit-identical to an unpadded
    run. So the batching policy is part of the target and recorded with every query: ``per_clip``
    runs every clip alone (exact, slower); ``bucket`` sorts clips by length, groups clips within 5%
    of each other up to ``batch_seconds`` of padded audio per forward, zero-pads to the longest in
    the group, passes an ``attention_mask`` when the model was trained with one (layer-norm CNN),
    and trims each output to the clip's own frame count.
    """

    def __init__(
        self,
        location: str,
        layers: str | None = None,
        padding: str = "per_clip",
        batch_seconds: float = 60.0,
        device: str = "cpu",
    ):
        from transformers import AutoModel

        if padding not in PADDINGS:
            raise InputError(f"unknown padding {padding!r}; valid: {list(PADDINGS)}")
        self.location = location
        self.padding = padding
        self.batch_seconds = float(batch_seconds)
        self.device = torch.device(device)

        is_dir = os.path.isdir(location)
        # float32 whatever the checkpoint's storage dtype, so outputs do not depend on it.
        self.model = AutoModel.from_pretrained(location, local_files_only=is_dir).float().eval()
        self.model.to(self.device)
        config = self.model.config
        self._kernels = [int(k) for k in config.conv_kernel]
        self._strides = [int(s) for s in config.conv_stride]
        self._uses_attention_mask = config.feat_extract_norm == "layer"
        self.normalize = _wants_normalization(location, is_dir, config.feat_extract_norm)

        self.frame_rate = SAMPLE_RATE / math.prod(self._strides)
        receptive = 1
        for kernel, stride in zip(reversed(self._kernels), reversed(self._strides), strict=True):
            receptive = (receptive - 1) * stride + kernel
        self.min_samples = receptive

        n_states = config.num_hidden_layers + 1
        self._indices = parse_layers(layers, count=n_states, first=0, default=n_states - 1)
        self.layers = [f"hidden_{i}" for i in self._indices]

        self.spec = f"hf:{location}?layers={','.join(map(str, self._indices))}&padding={padding}"
        if padding == "bucket":
            self.spec += f"&batch_seconds={self.batch_seconds:g}"

    def n_frames(self, n_samples: int) -> int:
        """Frames the CNN feature encoder produces for ``n_samples`` of input (transformers' formula)."""
        for kernel, stride in zip(self._kernels, self._strides, strict=True):
            n_samples = (n_samples - kernel) // stride + 1
        return n_samples

    def __call__(self, wavs: list[np.ndarray], keys: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        clips = [self._prepare(wav) for wav in wavs]
        if self.padding == "per_clip":
            return [self._forward([clip])[0] for clip in clips]
        results: list[dict[str, np.ndarray] | None] = [None] * len(clips)
        for group in self._buckets([len(clip) for clip in clips]):
            for index, frames in zip(group, self._forward([clips[i] for i in group]), strict=True):
                results[index] = frames
        return results

    def _prepare(self, wav: np.ndarray) -> np.ndarray:
        wav = as_clip(wav, self.min_samples)
        if self.normalize:
            # Same formula as transformers' Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm.
            wav = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)
        return wav

    # -- fine-tuning (an owner watermarking their encoder) -----------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The weights a fine-tune changes."""
        return self.model

    def encode(self, wavs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable answers ``{layer: (B, T, D)}`` for equal-length clips ``(B, N)``, with the
        checkpoint's input normalisation (dropout stays off: the model is in eval mode)."""
        if self.normalize:
            wavs = (wavs - wavs.mean(1, keepdim=True)) / torch.sqrt(
                wavs.var(1, unbiased=False, keepdim=True) + 1e-7
            )
        states = self.model(wavs, output_hidden_states=True).hidden_states
        return {name: states[i] for name, i in zip(self.layers, self._indices, strict=True)}

    def save_weights(self, directory: str | os.PathLike) -> str:
        """``save_pretrained`` into ``directory`` (with the preprocessor config, so the input
        normalisation stays the same); returns the spec that loads it with this target's options."""
        directory = os.path.abspath(directory)
        self.model.save_pretrained(directory)
        (Path(directory) / "preprocessor_config.json").write_text(
            json.dumps({"do_normalize": self.normalize})
        )
        return self.spec.replace(f"hf:{self.location}?", f"hf:{directory}?", 1)

    def _buckets(self, lengths: list[int]) -> list[list[int]]:
        max_samples = self.batch_seconds * SAMPLE_RATE
        groups: list[list[int]] = []
        for index in sorted(range(len(lengths)), key=lengths.__getitem__):
            if groups:
                group = groups[-1]
                shortest = lengths[group[0]]
                # Sorted ascending, so this clip is the group's longest and sets the padded length.
                if (
                    lengths[index] <= shortest * (1 + _BUCKET_TOLERANCE)
                    and (len(group) + 1) * lengths[index] <= max_samples
                ):
                    group.append(index)
                    continue
            groups.append([index])
        return groups

    def _forward(self, clips: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        longest = max(len(clip) for clip in clips)
        batch = np.zeros((len(clips), longest), dtype=np.float32)
        mask = np.zeros((len(clips), longest), dtype=np.int64)
        for row, clip in enumerate(clips):
            batch[row, : len(clip)] = clip
            mask[row, : len(clip)] = 1
        kwargs = {}
        if len(clips) > 1 and self._uses_attention_mask:
            kwargs["attention_mask"] = torch.from_numpy(mask).to(self.device)
        with torch.inference_mode():
            states = self.model(
                torch.from_numpy(batch).to(self.device), output_hidden_states=True, **kwargs
            ).hidden_states
            chosen = [states[i].float().cpu().numpy() for i in self._indices]
        outputs = []
        for row, clip in enumerate(clips):
            n = self.n_frames(len(clip))
            outputs.append(
                {name: np.ascontiguousarray(h[row, :n]) for name, h in zip(self.layers, chosen, strict=True)}
            )
        return outputs


def _wants_normalization(location: str, is_dir: bool, feat_extract_norm: str) -> bool:
    """``do_normalize`` from the checkpoint's preprocessor config, else ``feat_extract_norm == "layer"``."""
    if is_dir:
        path = os.path.join(location, "preprocessor_config.json")
        path = path if os.path.isfile(path) else None
    else:
        from transformers.utils import cached_file

        path = cached_file(
            location,
            "preprocessor_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    if path is None:
        return feat_extract_norm == "layer"
    with open(path) as f:
        # A missing key means the feature extractor's own default, which is True.
        return bool(json.load(f).get("do_normalize", True))
