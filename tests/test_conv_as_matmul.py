"""The waveform CNN as matrix products computes what its convolutions compute, values and gradients."""

import pytest
import torch

from speechmimic import conv_as_matmul
from speechmimic.student import build_student


@pytest.mark.parametrize("samples", [400, 401, 4321, 16000])
def test_the_cnn_as_products_equals_the_convolutions(samples):
    torch.manual_seed(0)
    student = build_student("tiny", frontend="conv", conv_dim=24).train()
    cnn = student.frontend.cnn
    # clips of one batch padded to one length, as in a training batch; speech-like scale
    wav = 0.1 * torch.randn(3, samples)
    wav[1, samples // 2 :] = 0
    assert conv_as_matmul.applies(cnn, wav)  # else this test compares the convolutions with themselves
    reference = cnn(wav.unsqueeze(1)).transpose(1, 2)
    products = conv_as_matmul.waveform_cnn(cnn, wav)
    assert products.shape == reference.shape
    assert torch.allclose(products, reference, atol=1e-5, rtol=1e-4)

    weights = torch.randn_like(reference)  # a loss that weighs every output differently
    grads_ref = torch.autograd.grad((reference * weights).sum(), list(cnn.parameters()))
    grads = torch.autograd.grad((products * weights).sum(), list(cnn.parameters()))
    for (name, _), g, r in zip(cnn.named_parameters(), grads, grads_ref, strict=True):
        assert torch.allclose(g, r, atol=1e-4 * float(r.abs().max()), rtol=1e-3), name


def test_inference_and_autocast_keep_the_convolutions():
    cnn = build_student("tiny", frontend="conv", conv_dim=8).frontend.cnn
    wav = torch.zeros(1, 1600)
    with torch.no_grad():
        assert not conv_as_matmul.applies(cnn, wav)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv_as_matmul.applies(cnn, wav)
    assert not conv_as_matmul.applies(cnn, torch.zeros(1, 399))  # shorter than one frame: the conv's error
    cnn.requires_grad_(False)
    assert not conv_as_matmul.applies(cnn, wav)


def test_the_hand_written_norm_has_autograds_gradients_padding_included():
    torch.manual_seed(0)
    # a DC offset (mean far from 0) and padded frames that get gradient too: every term of the backward
    x = (3.0 + torch.randn(2, 12, 5, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    norm = conv_as_matmul._NormGelu.apply
    assert torch.autograd.gradcheck(lambda x, w, b: norm(x, w, b, 9, 1e-5), (x, weight, bias))

    def reference(x, w, b):
        var, mean = torch.var_mean(x[:, :9], 1, unbiased=False, keepdim=True)
        return torch.nn.functional.gelu((x - mean) * torch.rsqrt(var + 1e-5) * w + b)

    assert torch.allclose(norm(x, weight, bias, 9, 1e-5), reference(x, weight, bias))
