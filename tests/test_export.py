"""A student exported to TorchScript and ONNX reproduces load_upstream's outputs, at any clip length."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from speechmimic import load_upstream
from speechmimic.cli import main
from speechmimic.export import TOLERANCE, export, read_metadata
from speechmimic.student import HeadSpec, build_student

onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export needs pip install 'speechmimic[export]'")


def run_file(path, waveform: torch.Tensor) -> list[np.ndarray]:
    """The exported file alone, in a fresh process, as a deployment would load it."""
    code = (
        "import sys, numpy as np\n"
        "path, x = sys.argv[1], np.load(sys.argv[2])\n"
        "if path.endswith('.onnx'):\n"
        "    import onnxruntime\n"
        "    outs = onnxruntime.InferenceSession(path).run(None, {'waveform': x})\n"
        "else:\n"
        "    import torch\n"
        "    outs = [o.numpy() for o in torch.jit.load(path)(torch.from_numpy(x))]\n"
        "np.savez(sys.argv[3], *outs)\n"
    )
    inp, out = f"{path}.in.npy", f"{path}.out.npz"
    np.save(inp, waveform.numpy())
    subprocess.run([sys.executable, "-c", code, str(path), inp, out], check=True)
    with np.load(out) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def clips_of_three_lengths(speech_clips) -> list[torch.Tensor]:
    pool, _ = speech_clips
    words = [c for c in pool if c.labels["kind"] == "keyword"]
    sentences = [c for c in pool if c.labels["kind"] == "sentence"]
    long = np.concatenate([c.load() for c in sentences[:4]])  # ~12 s: several sentences in a row
    return [torch.from_numpy(words[0].load()), torch.from_numpy(sentences[0].load()), torch.from_numpy(long)]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_reproduces_the_student(tmp_path, tiny_student, speech_clips, fmt):
    directory = tiny_student[0]
    path = tmp_path / ("student.pt" if fmt == "torchscript" else "student.onnx")
    meta = export(directory, fmt, path)
    upstream = load_upstream(directory)
    assert [o["name"] for o in meta["outputs"]] == upstream.hidden_state_names
    assert meta["downsample_rate"] == upstream.downsample_rate == 160
    assert read_metadata(path) == {k: v for k, v in meta.items() if k != "check"}
    assert [c["max_error"] <= TOLERANCE for c in meta["check"]] == [True] * 3
    wavs = clips_of_three_lengths(speech_clips)
    assert len({len(w) for w in wavs}) == 3 and len(wavs[-1]) > 10 * 16000
    for wav in wavs:
        got = run_file(path, wav[None])
        expected = upstream([wav])["hidden_states"]
        n = len(wav)
        frames = eval(meta["frames"], {"N": n})  # the documented formula, as a user would apply it
        for e, g, o in zip(expected, got, meta["outputs"], strict=True):
            e = e[0].numpy()
            assert g.shape == (1, frames, o["shape"][-1]) == (1, *e.shape)
            error = np.abs(g[0] - e).max() / max(1.0, np.abs(e).max())
            assert error <= TOLERANCE, (o["name"], n, error)
            if fmt == "torchscript":
                # PyTorch's own kernels: the same numbers, up to the order of the BLAS's sums, which
                # may differ in another process (MKL's paths depend on buffer alignment; once 5.6e-6)
                assert error <= 1e-5
    # a batch of clips of one length
    pair = torch.stack([wavs[1], wavs[1].flip(0)])
    got = run_file(path, pair)
    for i in range(2):
        expected = upstream([pair[i]])["hidden_states"][-1][0].numpy()
        assert np.abs(got[-1][i] - expected).max() <= TOLERANCE * max(1.0, np.abs(expected).max())


def test_onnx_export_of_a_waveform_cnn_student(tmp_path):
    torch.manual_seed(0)
    student = build_student("tiny", [HeadSpec("hidden_1", 24, 50.0)], frontend="conv")
    student.save(tmp_path / "s", extra={"target": "hf:somewhere"})
    meta = export(tmp_path / "s", "onnx", tmp_path / "s.onnx")
    assert meta["downsample_rate"] == 320 and meta["target"] == "hf:somewhere"
    wav = torch.randn(1, 16000 * 2 + 123) * 0.1
    got = run_file(tmp_path / "s.onnx", wav)
    expected = load_upstream(tmp_path / "s")([wav[0]])["hidden_states"]
    for e, g in zip(expected, got, strict=True):
        assert g.shape == (1, *e.shape[1:])
        assert np.abs(g - e.numpy()).max() <= TOLERANCE * max(1.0, float(e.abs().max()))


def test_export_command(tmp_path, tiny_student, capsys):
    out = tmp_path / "s.pt"
    assert (
        main(["export", "--model", str(tiny_student[0]), "--format", "torchscript", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "pred.lstm3" in printed and "160 samples per frame" in printed and out.exists()
    assert not (tmp_path / "s.pt.tmp").exists()
    assert main(["export", "--model", str(tmp_path / "nowhere"), "--format", "onnx", "--out", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
