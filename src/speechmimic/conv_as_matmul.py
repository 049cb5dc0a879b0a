"""The waveform CNN's training step on a CPU as matrix products, frames-major from start to end.

oneDNN's 1-d convolutions spend a fifth of the CNN's time copying activations between layouts
(measured on 2 cores, batch 8 x 4 s), and the CNN is three quarters of a stage-2 step of
DistilHuBERT's size (``benchmarks/distill_throughput.py``).
Here every layer is one or two ``mm`` calls on views of a (B, T, C) tensor, with nothing copied:
a stride-2 layer sees its input as (B * T / 2, 2C) rows of frame pairs, so kernel 2 is one product
and kernel 3 adds the next pair's first frame, a view shifted by one row. That needs an even number
of frames at every layer, so the waveform is padded to a multiple of ``64`` frames of the first
layer; padded frames only ever feed outputs past the last real one, which are cut at the end, so
the result equals the convolutions' (``tests/test_conv_as_matmul.py`` checks values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _FirstLayer(torch.autograd.Function):
    """Waveform windows (B, T, K) @ a (O, 1, K) kernel -> (B, T, O); the waveform needs no gradient."""

    @staticmethod
    def forward(ctx, windows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(windows)
        b, t, k = windows.shape
        return (windows.reshape(b * t, k) @ weight.view(-1, k).t()).view(b, t, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (windows,) = ctx.saved_tensors
        b, t, k = windows.shape
        # (K, BT) @ (BT, O): the long dimension inside the product, where BLAS is fast
        gw = windows.reshape(b * t, k).t() @ grad.reshape(b * t, -1)
        return None, gw.t().reshape(-1, 1, k)


class _Stride2(torch.autograd.Function):
    """(B, T, C) contiguous, T even -> (B, T / 2, O): a convolution of stride 2, kernel 2 or 3."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        b, t, c = x.shape
        o, _, k = weight.shape
        pairs = x.view(b * t // 2, 2 * c)
        y = pairs @ _taps01(weight).t()
        if k == 3:  # the last output row of each clip reads the next clip: cut later, as padding
            y[:-1].addmm_(pairs[1:, :c], weight[:, :, 2].t())
        return y.view(b, t // 2, o)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        b, t, c = x.shape
        o, _, k = weight.shape
        pairs = x.view(b * t // 2, 2 * c)
        g = grad.reshape(b * t // 2, o)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gp = g @ _taps01(weight)
            if k == 3:
                gp[1:, :c].addmm_(g[:-1], weight[:, :, 2])
            gx = gp.view(b, t, c)
        if ctx.needs_input_grad[1]:
            gw = torch.empty_like(weight)
            gw[:, :, :2] = (g.t() @ pairs).view(o, 2, c).transpose(1, 2)
            if k == 3:
                gw[:, :, 2] = g[:-1].t() @ pairs[1:, :c]
        return gx, gw


class _NormGelu(torch.autograd.Function):
    """GELU(GroupNorm with a group per channel) of (B, T, C), statistics over each clip's first
    ``frames`` frames (the rest is padding). By hand because autograd's version is slow here:
    ``var_mean`` over the frames axis, then a backward of full-size temporaries (forward + backward
    1.15 s against 0.44 s on (8, 12800, 512), 2 threads); the sums over frames are batched products
    with a row of ones, and the backward writes in place into its own buffer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, frames: int, eps: float):
        real = x[:, :frames]
        mean = _frame_sum(real) / frames
        pre = torch.sub(x, mean)  # centred first: the two-pass variance, no cancellation
        var = torch.linalg.vecdot(pre[:, :frames], pre[:, :frames], dim=1).unsqueeze(1) / frames
        rstd = torch.rsqrt(var + eps)
        pre.mul_(rstd * weight).add_(bias)
        ctx.save_for_backward(x, pre, mean, rstd, weight)
        ctx.frames = frames
        return F.gelu(pre)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, pre, mean, rstd, weight = ctx.saved_tensors
        n = ctx.frames
        gp = torch.ops.aten.gelu_backward(grad, pre)
        s1 = _frame_sum(gp)  # (B, 1, C)
        s2 = torch.linalg.vecdot(gp, x, dim=1).unsqueeze(1) - mean * s1  # sum of gp * (x - mean)
        gw = (rstd * s2).sum((0, 1))
        gb = s1.sum((0, 1))
        scale = rstd * weight
        # through the statistics, which only the real frames make but every frame uses
        coef = -scale * rstd * rstd * s2 / n
        gx = gp.mul_(scale)
        gx[:, :n].addcmul_(x[:, :n], coef).add_(-scale * s1 / n - coef * mean)
        return gx, gw, gb, None, None


def _frame_sum(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, 1, C), summed over frames as one batched product (a reduction over the middle
    axis is several times slower)."""
    return torch.bmm(x.new_ones(x.shape[0], 1, x.shape[1]), x)


def _taps01(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, k) -> (O, 2C): the first two taps, ordered as a row of frame pairs (frame, channel)."""
    o, c, _ = weight.shape
    return weight[:, :, :2].transpose(1, 2).reshape(o, 2 * c)


def applies(cnn: nn.Sequential, wav: torch.Tensor) -> bool:
    """Whether :func:`waveform_cnn` should run: a CPU training step (oneDNN is faster without
    gradients; GPUs have cuDNN; autocast would mix dtypes in the backward) on a clip long enough for
    one frame, with the layer pattern it implements (wav2vec 2.0's: stride 5, then stride 2)."""
    first = cnn[0]
    return (
        wav.device.type == "cpu"
        and torch.is_grad_enabled()
        and first.weight.requires_grad
        and not torch.is_autocast_enabled("cpu")
        and wav.shape[-1] >= 400
        and first.stride[0] == 5
        and all(m.stride[0] == 2 and m.kernel_size[0] in (2, 3) for m in _convs(cnn)[1:])
        and all(m.bias is None for m in _convs(cnn))
    )


def waveform_cnn(cnn: nn.Sequential, wav: torch.Tensor) -> torch.Tensor:
    """What ``cnn(wav.unsqueeze(1)).transpose(1, 2)`` computes, (B, T, C), for ``cnn`` as built by
    the student's ``ConvFrontend``: Conv1d (no bias) -> GroupNorm(C, C) -> GELU, then Conv1d -> GELU."""
    convs = _convs(cnn)
    norm: nn.GroupNorm = cnn[1]
    k0, s0 = convs[0].kernel_size[0], convs[0].stride[0]
    frames = (wav.shape[-1] - k0) // s0 + 1
    alloc = -(-frames // 2 ** (len(convs) - 1)) * 2 ** (len(convs) - 1)
    wav = F.pad(wav, (0, s0 * (alloc - 1) + k0 - wav.shape[-1]))
    x = _FirstLayer.apply(wav.unfold(1, k0, s0).contiguous(), convs[0].weight)
    x = _NormGelu.apply(x, norm.weight, norm.bias, frames, norm.eps)
    for conv in convs[1:]:
        x = F.gelu(_Stride2.apply(x, conv.weight))
        frames = (frames - conv.kernel_size[0]) // 2 + 1
    return x[:, :frames]


def _convs(cnn: nn.Sequential) -> list[nn.Conv1d]:
    return [m for m in cnn if isinstance(m, nn.Conv1d)]
