"""What float16 ledgers save: bytes on disk per queried second, and what stage 2 reads, float16 vs float32.

The same clips (the demo corpus's pool: real synthetic speech, 288 clips, 283 s) are paid once into a
float32 ledger and once into a float16 one, side by side, from the same target (resemblyzer, its
three layers, 256-d at 100 Hz); then each is read the way stage 2 reads it. Prints the bytes per
queried second of answers (blobs) and of the whole ledger folder, stage 2's in-memory answers, the
largest difference of a float16 answer from its float32 original, the ratios, and what lossless
compression (zlib, with and without a byte shuffle) would take off the float16 answers.

    python benchmarks/ledger_storage.py [--target "resemblyzer?layers=all"] [--clips N]
"""

from __future__ import annotations

import argparse
import tempfile
import zlib
from pathlib import Path

import numpy as np

from speechmimic.distill import PairedClips
from speechmimic.ledger import Ledger, query_clips
from speechmimic.recipes.demo import demo_corpus
from speechmimic.targets import load_backend


def folder_bytes(root: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in root.glob(pattern) if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="resemblyzer?layers=all")
    ap.add_argument("--clips", type=int, default=None, help="the first N clips of the pool (default: all)")
    args = ap.parse_args()
    pool, _ = demo_corpus()
    clips = pool[: args.clips] if args.clips else pool
    seconds = sum(c.duration for c in clips)
    target = load_backend(args.target)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = {store: Ledger(Path(tmp) / store, store=store) for store in ("float32", "float16")}
        for store, ledger in ledgers.items():
            query_clips(target, clips, ledger, progress=False)
            paired = PairedClips(clips, ledger)
            answers = sum(v.nbytes for i in range(len(paired)) for v in paired[i][1].values())
            rows[store] = {
                "blobs": folder_bytes(ledger.root, "blobs/**/*.safetensors") / seconds,
                "folder": folder_bytes(ledger.root) / seconds,
                "read": answers / seconds,
            }
        # What lossless compression would add on top of float16, before building it into the ledger:
        # zlib on the answers' bytes as stored, and after a byte shuffle (high bytes, then low bytes).
        raw = packed = shuffled = 0
        for clip in clips:
            ledger = ledgers["float16"]
            for v in ledger.get(ledger.key_of(clip.id), dtype=None).values():
                b = v.tobytes()
                raw += len(b)
                packed += len(zlib.compress(b, 6))
                shuffled += len(
                    zlib.compress(np.frombuffer(b, np.uint8).reshape(-1, v.itemsize).T.tobytes(), 6)
                )
        worst = 0.0
        for clip in clips:
            a = ledgers["float32"].get_clip(clip.id)
            b = ledgers["float16"].get_clip(clip.id)
            for name in a:
                worst = max(worst, float(np.abs(a[name] - b[name]).max() / (np.abs(a[name]).max() + 1e-12)))
    print(f"{len(clips)} clips, {seconds:.1f} s queried, target {target.spec}")
    print("| store | answer bytes / queried s | ledger folder bytes / s | stage-2 answer bytes read / s |")
    print("|---|---|---|---|")
    for store, r in rows.items():
        print(f"| {store} | {r['blobs']:,.0f} | {r['folder']:,.0f} | {r['read']:,.0f} |")
    ratio = {k: rows["float16"][k] / rows["float32"][k] for k in rows["float16"]}
    print(
        f"\nratio float16 / float32: answers {ratio['blobs']:.3f}, folder {ratio['folder']:.3f}, "
        f"stage-2 reads {ratio['read']:.3f}; largest error of a float16 answer, relative to its "
        f"largest value: {worst:.1e}"
    )
    print(
        f"lossless compression of the float16 answers: zlib {packed / raw:.3f}, "
        f"byte-shuffled zlib {shuffled / raw:.3f} of their bytes"
    )


if __name__ == "__main__":
    main()
