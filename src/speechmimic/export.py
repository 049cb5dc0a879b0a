"""A student as one self-contained file for deployment: TorchScript or ONNX.

The file maps one input, ``waveform`` (B, N) float32 (16 kHz mono, B clips of one length N; both
dynamic), to one output per state, in the order and with the names of ``load_upstream(student)``'s
``hidden_state_names``: ``student.frontend``, ``student.layer1``..., then ``pred.<layer>``, the
student's prediction of each target layer in the target's units. Each is (B, T, D) at
``downsample_rate`` samples per frame, with T given by ``frames`` in the metadata (for the log-mel
front end ``(N // hop + 1) * ratio``). The outputs are those of ``load_upstream(student)`` for a clip
encoded whole: the file does no windowing, so attention memory grows with the square of N; cut long
recordings first (``load_upstream`` windows clips over 30 s).

The metadata (ONNX ``metadata_props`` key ``speechmimic``; TorchScript extra file
``speechmimic.json``) is JSON with the names, widths, sample rate, downsample rate, frame formula and
the target the student copies. :func:`export` reloads the file it wrote and checks its outputs
against the PyTorch student at three clip lengths: max |file - torch| <= ``TOLERANCE`` * max(1,
max |torch|) for every output, or it raises.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from speechmimic import dsp
from speechmimic.audio import SAMPLE_RATE
from speechmimic.errors import InputError
from speechmimic.student import W2V2_CONV, FbankFrontend, Student

FORMATS = ("torchscript", "onnx")
METADATA_FILE = "speechmimic.json"
# ONNX Runtime's float32 kernels (and the log-mel as a convolution) differ from PyTorch's by 5e-6 at
# most on the demo's student at 12 s; TorchScript replays PyTorch's own kernels, exactly.
TOLERANCE = 1e-4
CHECK_SECONDS = (0.5, 3.0, 12.0)
MAX_SECONDS = 3600


class _PortableFbank(nn.Module):
    """A log-mel front end computing its spectrum as a convolution (see :func:`dsp.log_mel_dft`)."""

    def __init__(self, frontend: FbankFrontend):
        super().__init__()
        self.frontend = frontend
        self.register_buffer("basis", dsp.dft_basis(frontend.window), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.frontend.from_log_mel(dsp.log_mel_dft(wav, self.basis, self.frontend.fbank))


class ExportedStudent(nn.Module):
    """A student's forward as a plain function of a waveform batch: a tuple of (B, T, D) tensors.

    ``portable``: a copy of the student whose log-mel is a convolution, for ONNX (see
    :func:`dsp.log_mel_dft`); otherwise the student itself, computing what ``load_upstream`` does."""

    def __init__(self, student: Student, portable: bool = False):
        super().__init__()
        if portable and isinstance(student.frontend, FbankFrontend):
            student = copy.deepcopy(student)
            student.frontend = _PortableFbank(student.frontend)
        self.student = student.eval().requires_grad_(False)  # inference only, in the file too
        ratios = {h.ratio for h in student.heads.values()} or {1}
        self.ratio = max(ratios)  # as load_upstream: heads share the target's frame rate in practice

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, ...]:
        states, _, preds = self.student(waveform)
        own = [s.repeat_interleave(self.ratio, 1) for s in states]
        return tuple(own) + tuple(self.student.heads[name].denormalise(p) for name, p in preds.items())


def describe(student: Student, config: dict) -> dict:
    """The metadata written into an exported file."""
    module = ExportedStudent(student)
    cfg = student.cfg
    names = (
        ["student.frontend"]
        + [f"student.layer{i + 1}" for i in range(cfg.layers)]
        + [f"pred.{name}" for name in student.heads]
    )
    widths = [cfg.dim] * (cfg.layers + 1) + [h.spec.dim for h in student.heads.values()]
    if cfg.frontend == "fbank":
        frames = f"(N // {cfg.hop} + 1) * {module.ratio}"
    else:  # the waveform CNN: each layer (kernel k, stride s) maps n samples to (n - k) // s + 1
        layers = ", ".join(f"({k}, {s})" for _, k, s in W2V2_CONV)
        frames = f"n = N, then n = (n - k) // s + 1 for (k, s) in {layers}; T = n * {module.ratio}"
    return {
        "format": "speechmimic student",
        "input": {"name": "waveform", "shape": ["batch", "samples"], "dtype": "float32"},
        "outputs": [{"name": n, "shape": ["batch", "frames", d]} for n, d in zip(names, widths, strict=True)],
        "sample_rate": SAMPLE_RATE,
        "downsample_rate": cfg.hop // module.ratio,
        "frames": frames,
        "min_samples": cfg.min_samples,
        "target": config.get("target"),
    }


def _check_clips(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Noise with a decaying spectrum and a few tones: speech-like levels, not white noise at full scale.
    clips = []
    for seconds in CHECK_SECONDS:
        n = int(seconds * SAMPLE_RATE)
        t = torch.arange(n) / SAMPLE_RATE
        noise = torch.cumsum(torch.randn(n, generator=g), 0)
        noise = (noise - noise.mean()) / (noise.std() + 1e-8)
        tones = sum(torch.sin(2 * torch.pi * f * t) for f in (180.0, 420.0, 1100.0))
        clips.append((0.05 * noise + 0.03 * tones)[None].float())
    return clips


def _runner(path: Path, fmt: str):
    if fmt == "torchscript":
        module = _jit_load(path)
        return lambda x: [o.numpy() for o in module(x)]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"waveform": x.numpy()})


def check(path: Path, fmt: str, student: Student) -> list[dict]:
    """The exported file against the PyTorch student at ``CHECK_SECONDS``: the worst error per length."""
    run = _runner(path, fmt)
    module = ExportedStudent(student)
    rows = []
    for clip in _check_clips():
        with torch.no_grad():
            expected = [o.numpy() for o in module(clip)]
        got = run(clip)
        worst = 0.0
        for e, g in zip(expected, got, strict=True):
            if e.shape != g.shape:
                raise RuntimeError(f"{path}: an output of shape {g.shape} where PyTorch gives {e.shape}")
            worst = max(worst, float(np.abs(e - g).max()) / max(1.0, float(np.abs(e).max())))
        rows.append({"seconds": clip.shape[1] / SAMPLE_RATE, "max_error": worst})
        if worst > TOLERANCE:
            raise RuntimeError(
                f"{path}: outputs differ from the PyTorch student by {worst:.2e} on a "
                f"{clip.shape[1] / SAMPLE_RATE:g} s clip (tolerance {TOLERANCE:g})"
            )
    return rows


def export(model: str | os.PathLike, fmt: str, out: str | os.PathLike) -> dict:
    """Write the student in ``model`` (an extracted student's folder) to ``out`` as ``fmt``; returns its
    metadata with ``check``, the measured error at each checked clip length."""
    if fmt not in FORMATS:
        raise InputError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    student, config = Student.load(model)
    meta = describe(student, config)
    module = ExportedStudent(student, portable=fmt == "onnx")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    example = torch.zeros(2, SAMPLE_RATE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter notes on shapes the check below covers
        if fmt == "torchscript":
            traced = torch.jit.trace(module, (example,), check_trace=False)
            torch.jit.save(traced, str(tmp), _extra_files={METADATA_FILE: json.dumps(meta)})
        else:
            _export_onnx(module, example, tmp, meta)
    meta["check"] = check(tmp, fmt, student)
    tmp.replace(out)
    return meta


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    try:
        import onnx
        import onnxruntime  # noqa: F401  (to check the file)
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise InputError(f"ONNX export needs {e.name}: pip install 'speechmimic[export]'") from None
    batch = torch.export.Dim("batch", min=1, max=1024)
    samples = torch.export.Dim("samples", min=meta["min_samples"], max=MAX_SECONDS * SAMPLE_RATE)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # notes on torchvision ops this model has none of
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its steps
            program = torch.onnx.export(
                module,
                (example,),
                input_names=["waveform"],
                output_names=[o["name"] for o in meta["outputs"]],
                dynamic_shapes={"waveform": {0: batch, 1: samples}},
                dynamo=True,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = "speechmimic", json.dumps(meta)
    onnx.save_model(proto, str(path), save_as_external_data=False)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of an exported file (either format)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props["speechmimic"])
    files = {METADATA_FILE: ""}
    _jit_load(path, files)
    return json.loads(files[METADATA_FILE])


def _jit_load(path: Path, extra_files: dict | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is in maintenance, not gone
        return torch.jit.load(str(path), _extra_files=extra_files)
