"""``speechmimic embed``: hidden states of any upstream for audio files, into an .npz."""

from __future__ import annotations

import sys

import numpy as np
import torch

from speechmimic.audio import AudioError, load_audio
from speechmimic.cli import _options
from speechmimic.upstream import load_upstream


def register(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="write the hidden states of a student or target for audio files to .npz",
        description="Run an upstream (an extracted student folder, or a target spec) on audio "
        "files and save every hidden state. Keys are '<file index>/<state name>', "
        "arrays (T, D); 'files', 'names' and 'downsample_rate' describe them; files that cannot be "
        "read are listed (and in 'skipped') and stop nothing.",
    )
    p.add_argument(
        "--model", required=True, help="extracted student folder, or a target spec (hf:..., resemblyzer)"
    )
    p.add_argument("--out", required=True, help=".npz file to write")
    p.add_argument(
        "files", nargs="+", metavar="FILES", help="audio files (wav/flac/ogg; resampled to 16 kHz mono)"
    )
    _options.add_device(p)
    _options.add_chunk_seconds(p)
    _options.add_target_ledger(p, "--model")
    p.set_defaults(func=run)


def run(args) -> int:
    upstream = load_upstream(
        args.model, device=args.device, ledger=args.ledger, chunk_seconds=args.chunk_seconds
    )
    names = list(upstream.hidden_state_names)
    arrays: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for i, path in enumerate(args.files):
        try:
            wav = torch.from_numpy(load_audio(path)).to(args.device)
        except AudioError as e:  # one bad file is that file's failure, not the run's
            skipped[path] = e.reason
            continue
        states = upstream([wav])["hidden_states"]
        for name, s in zip(names, states, strict=True):
            arrays[f"{i}/{name}"] = s[0].cpu().numpy()
    for path, reason in skipped.items():
        print(f"skipped {path}: {reason}")
    done = len(args.files) - len(skipped)
    if not done:
        print(f"error: none of the {len(args.files)} files could be read; nothing written", file=sys.stderr)
        return 1
    np.savez(
        args.out,
        files=np.array(args.files),
        names=np.array(names),
        downsample_rate=np.array(upstream.downsample_rate),
        skipped=np.array(list(skipped), dtype=str),
        **arrays,
    )
    print(f"{done} files x {len(names)} states -> {args.out}")
    return 0
