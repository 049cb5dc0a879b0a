"""``speechmimic export``: a student as one self-contained TorchScript or ONNX file."""

from __future__ import annotations

from pathlib import Path

from speechmimic.export import CHECK_SECONDS, FORMATS, TOLERANCE, export


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a student to one TorchScript or ONNX file for deployment",
        description="Export an extracted student (its own layers and its predictions of the target's "
        "layers) as one self-contained file. Input 'waveform' (batch, samples) float32 at 16 kHz, "
        "clips of one length per batch; one output per state, named as the upstream's hidden states "
        "(student.frontend, student.layer1, ..., pred.<layer>), each (batch, frames, dim). The names, "
        "widths, downsample rate and frame formula are stored in the file (ONNX metadata "
        "'speechmimic'; TorchScript extra file 'speechmimic.json') and printed. The written file is "
        f"run on clips of {', '.join(f'{s:g}' for s in CHECK_SECONDS)} s and compared with the PyTorch "
        f"student: it is kept only if every output is within {TOLERANCE:g} (relative to max(1, its "
        "largest value)). ONNX needs: pip install 'speechmimic[export]'.",
    )
    p.add_argument("--model", required=True, help="an extracted student's folder")
    p.add_argument("--format", required=True, choices=FORMATS, help="torchscript (.pt) or onnx (.onnx)")
    p.add_argument("--out", required=True, help="file to write")
    p.set_defaults(func=run)


def run(args) -> int:
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"{args.model}: no such folder (an extracted student's folder)")
    meta = export(args.model, args.format, args.out)
    rate, least = meta["sample_rate"], meta["min_samples"]
    print(f"input   waveform (batch, samples) float32 at {rate} Hz, samples >= {least}")
    print(
        f"outputs (batch, frames, dim) at {meta['downsample_rate']} samples per frame; "
        f"frames for N samples: {meta['frames']}"
    )
    for out in meta["outputs"]:
        print(f"  {out['name']:<24} {out['shape'][-1]}")
    checks = ", ".join(f"{c['seconds']:g} s {c['max_error']:.1e}" for c in meta["check"])
    print(f"wrote {args.out}; error against the PyTorch student: {checks} (tolerance {TOLERANCE:g})")
    return 0
