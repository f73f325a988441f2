"""The compute of every adapted layer: one place, so a faster path helps every feature.

Each function adds one adapter's contribution to a base output. The scale is applied to the
rank-r tensor (`B (s * A x)` equals `s * B A x`) so no full-size pass is spent on it, and the add is
fused into the output matmul (`addmm`) where the dtypes allow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def add_lora_linear(
    result: torch.Tensor,
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor | None,
    scaling: float,
    dropout: nn.Module,
) -> torch.Tensor:
    """Return `result + scaling * (B (A dropout(x)) + bias_b)`.

    Args:
        result: base output, shape (..., out_features).
        x: base input, shape (..., in_features).
        weight_a: (r, in_features). weight_b: (out_features, r). bias_b: (out_features,) or None.
        scaling: alpha / r (or alpha / sqrt(r)).
        dropout: applied to `x` on the adapter path only.
    """
    if _fusable(result, x, weight_a):
        return _run_fused(
            result, x, weight_a, weight_b, bias_b, None, None, scaling, _drop_probability(dropout)
        )
    hidden = F.linear(dropout(x.to(weight_a.dtype)), weight_a) * scaling
    bias = bias_b * scaling if bias_b is not None else None
    return result + F.linear(hidden, weight_b, bias).to(result.dtype)


def _fusable(result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor) -> bool:
    """The fused path runs where result, input and adapter share a dtype, or on CUDA where a
    half-precision base computes its float32 adapter in the base dtype (weights cast, tiny)."""
    if result.dtype == x.dtype == weight_a.dtype:
        return True
    return x.is_cuda and result.dtype == x.dtype and x.dtype in (torch.float16, torch.bfloat16)


def _drop_probability(dropout: nn.Module) -> float:
    return float(dropout.p) if _drops(dropout) else 0.0


def _run_fused(
    result: torch.Tensor,
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor | None,
    factor: torch.Tensor | None,
    base_bias: torch.Tensor | None,
    scaling: float,
    p: float,
) -> torch.Tensor:
    """Flatten to 2-D, run `LoraLinearFunction`, restore the shape."""
    flat = LoraLinearFunction.apply(
        result.reshape(-1, result.shape[-1]),
        x.reshape(-1, x.shape[-1]),
        weight_a,
        weight_b,
        bias_b,
        factor,
        base_bias,
        scaling,
        p,
    )
    return flat.view(result.shape)


class LoraLinearFunction(torch.autograd.Function):
    """`out = result + s * (B A drop(x) + b_B)`, and with a DoRA factor f:
    `out = f * (result - b + s * (B A drop(x) + b_B)) + b` (b the base bias, f `m / ||W + s B A||`).

    One autograd node per adapter and layer. The scale multiplies the rank-r tensor, the add is the
    output matmul's `addmm`, and backward keeps only: the input x (which other adapters and layers
    reading the same x share), the rank-r hidden `s A drop(x)`, a one-byte keep-mask when dropout is
    on (the dropped input is rebuilt in backward, never stored), and for DoRA the output itself (from
    which `(result - b + lora)` is `out / f`) or, with a base bias, that direction.

    Shapes: result (N, out), x (N, in), weight_a (r, in), weight_b (out, r), bias_b / factor /
    base_bias (out,). The dropout mask is drawn as `torch.nn.functional.dropout` draws it, so a fixed
    seed drops the same elements as PEFT's `nn.Dropout`.
    """

    @staticmethod
    def forward(ctx, result, x, weight_a, weight_b, bias_b, factor, base_bias, scaling, p):
        compute = x.dtype
        a, b = weight_a.to(compute), weight_b.to(compute)
        dropped, keep = _dropout_with_mask(x, p) if p > 0 else (x, None)
        hidden = torch.mm(dropped, a.t()).mul_(scaling)
        out = torch.addmm(result, hidden, b.t())
        if bias_b is not None:
            out.add_(bias_b.to(compute), alpha=scaling)
        direction = recover = None
        if factor is not None:
            f = factor.to(compute)
            direction = out if base_bias is None else out.sub_(base_bias)
            out = direction * f if base_bias is None else torch.addcmul(base_bias, direction, f)
            # without a base bias the direction is out / f exactly (to rounding) unless some f is 0
            recover = base_bias is None and not torch.compiler.is_compiling() and not bool((f == 0).any())
        ctx.scaling, ctx.p, ctx.has_bias_b, ctx.recover = scaling, p, bias_b is not None, recover
        ctx.dtypes = (weight_a.dtype, weight_b.dtype)
        ctx.save_for_backward(x, keep, a, b, hidden, factor, out if recover else direction)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, a, b, hidden, factor, direction = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad_out
        grad_factor = grad_base_bias = None
        if factor is not None:
            f = factor.to(grad.dtype)
            if need[5]:
                moment = (grad * direction).sum(0)  # direction is the output itself when recovered
                grad_factor = (moment / f if ctx.recover else moment).to(factor.dtype)
            if need[6]:
                grad_base_bias = grad.sum(0) * (1 - f)
            grad = grad * f
        grad_b = grad.t().mm(hidden).to(ctx.dtypes[1]) if need[3] else None
        grad_bias_b = (grad.sum(0) * ctx.scaling).to(ctx.dtypes[1]) if need[4] and ctx.has_bias_b else None
        grad_hidden = grad.mm(b).mul_(ctx.scaling) if (need[1] or need[2]) else None
        grad_a = grad_x = None
        scale = 1.0 / (1.0 - ctx.p)
        if need[2]:
            dropped = x if keep is None else x * keep * scale
            grad_a = grad_hidden.t().mm(dropped).to(ctx.dtypes[0])
        if need[1]:
            grad_x = grad_hidden.mm(a)
            if keep is not None:
                grad_x = grad_x.mul_(keep).mul_(scale)
        return grad, grad_x, grad_a, grad_b, grad_bias_b, grad_factor, grad_base_bias, None, None


def _dropout_with_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(dropout(x), keep)` with a bool keep-mask; the same draw as `F.dropout(x, p)`."""
    if x.is_cuda:
        return torch.native_dropout(x, p, True)
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
    return x * keep * (1.0 / (1.0 - p)), keep


def add_lora_embedding(
    result: torch.Tensor,
    ids: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    scaling: float,
    base: nn.Embedding,
) -> torch.Tensor:
    """Return `result + scaling * B-projection of the A-rows looked up by `ids``.

    Args:
        result: base embeddings, shape (..., embedding_dim).
        ids: token ids, shape (...).
        weight_a: (r, num_embeddings); row lookup uses the base layer's padding_idx / max_norm.
        weight_b: (embedding_dim, r).
    """
    looked_up = _lookup_columns(ids, weight_a, base)
    return result + (F.linear(looked_up * scaling, weight_b)).to(result.dtype)


def add_lora_conv(
    result: torch.Tensor,
    x: torch.Tensor,
    conv_a: nn.Module,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor | None,
    scaling: float,
    dropout: nn.Module,
) -> torch.Tensor:
    """Return `result + scaling * (B * (A * dropout(x)) + bias_b)` for Conv1d/2d/3d.

    Args:
        result: base output, shape (N, out_channels, *spatial).
        conv_a: the rank-r convolution with the base layer's kernel, stride, padding, dilation.
        weight_b: (out_channels, r, 1, ...): a pointwise convolution.
    """
    hidden = conv_a(dropout(x.to(weight_b.dtype))) * scaling
    bias = bias_b * scaling if bias_b is not None else None
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight_b.dim() - 3]
    return result + conv(hidden, weight_b, bias).to(result.dtype)


def _lookup_columns(ids: torch.Tensor, weight_a: torch.Tensor, base: nn.Embedding) -> torch.Tensor:
    """Columns of A (r, num_embeddings) for `ids`, with the base layer's lookup options: (..., r)."""
    return F.embedding(
        ids,
        weight_a.t(),
        base.padding_idx,
        base.max_norm,
        base.norm_type,
        base.scale_grad_by_freq,
        base.sparse,
    )


def _drops(dropout: nn.Module) -> bool:
    return dropout.training and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 0.0) > 0


def add_dora_linear(
    result: torch.Tensor,
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    factor: torch.Tensor,
    scaling: float,
    dropout: nn.Module,
) -> torch.Tensor:
    """Return `result + (f - 1) * W dropout(x) + f * scaling * B A dropout(x)` (DoRA).

    Without dropout this is `f * (W x + scaling B A x) + b`: the DoRA weight applied to x.

    Args:
        base_weight: (out_features, in_features) (a transposed view for fan_in_fan_out).
        factor: (out_features,) `magnitude / ||W + scaling B A||`, norm detached.
    """
    if not _drops(dropout) and _fusable(result, x, weight_a):
        return _run_fused(result, x, weight_a, weight_b, None, factor, base_bias, scaling, 0.0)
    dropped = dropout(x.to(weight_a.dtype))
    lora = F.linear(F.linear(dropped, weight_a) * scaling, weight_b)
    if _drops(dropout):
        base_wx = F.linear(dropped.to(base_weight.dtype), base_weight)
    else:
        base_wx = result if base_bias is None else result - base_bias
    return result + ((factor - 1) * base_wx.to(factor.dtype) + factor * lora).to(result.dtype)


def add_dora_embedding(
    result: torch.Tensor,
    ids: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    factor: torch.Tensor,
    scaling: float,
    base: nn.Embedding,
) -> torch.Tensor:
    """Return `f * (E[ids] + scaling * A^T[ids] B^T)` (DoRA on an embedding), f of shape (embedding_dim,)."""
    looked_up = _lookup_columns(ids, weight_a, base)
    lora = F.linear(looked_up * scaling, weight_b)
    return result + ((factor - 1) * result.to(factor.dtype) + factor * lora).to(result.dtype)


def add_dora_conv(
    result: torch.Tensor,
    x: torch.Tensor,
    base: nn.Module,
    conv_a: nn.Module,
    weight_b: torch.Tensor,
    factor: torch.Tensor,
    scaling: float,
    dropout: nn.Module,
) -> torch.Tensor:
    """DoRA on ConvNd: `result + (f - 1) * (W * dropout(x)) + f * scaling * B * A * dropout(x)`.

    Args:
        factor: (out_channels,) broadcast over (N, out_channels, *spatial).
    """
    dropped = dropout(x.to(weight_b.dtype))
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight_b.dim() - 3]
    lora = conv(conv_a(dropped) * scaling, weight_b)
    view = (1, -1) + (1,) * (result.dim() - 2)
    if _drops(dropout):
        base_wx = base._conv_forward(dropped.to(base.weight.dtype), base.weight, None)
    else:
        base_wx = result if base.bias is None else result - base.bias.view(view)
    f = factor.view(view)
    return result + ((f - 1) * base_wx.to(f.dtype) + f * lora).to(result.dtype)
