"""The unfused-or-fused compute of every adapted layer: one place, so a faster path helps every
feature.

Each `add_*` function adds one adapter's contribution to a base output; `linear_with_adapter`
computes a plain linear base and its first adapter in one autograd node (`linear.py`). The scale
is applied to the rank-r tensor (`B (s * A x)` equals `s * B A x`) so no full-size pass is spent on
it, and the add is fused into the output matmul (`addmm`) where the dtypes allow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import drop_probability, dropout_fusable, fusable, fused_linear


def linear_with_adapter(
    *,
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor | None,
    factor: torch.Tensor | None,
    scaling: float,
    dropout: nn.Module,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """The base linear layer and one adapter in one node: `x W^T + b + scaling * (B A dropout(x) + bias_b)`,
    or with a DoRA `factor` f: `f * (x W^T + scaling * B A x) + b`.

    Args:
        x: (..., in_features). base_weight: (out_features, in_features) (a transposed view for
            fan_in_fan_out). base_bias: (out_features,) or None.
        weight_a, weight_b, bias_b, scaling, dropout: as in `add_lora_linear`.
        factor: (out_features,) `magnitude / ||W + scaling B A||` (norm detached) for DoRA, else None.
        hidden: (N, r) `scaling * A dropout(x)` from `sibling_hidden` (then the fused path is sure
            to apply and dropout was applied there), or None.
    """
    if hidden is not None:
        return fused_linear(
            None, x, base_weight, base_bias, None, weight_b, bias_b, factor, scaling, 0.0, hidden
        )
    p = drop_probability(dropout)
    if fusable(x, base_weight.dtype, weight_a) and (p == 0 or (factor is None and dropout_fusable(x, p))):
        return fused_linear(None, x, base_weight, base_bias, weight_a, weight_b, bias_b, factor, scaling, p)
    result = F.linear(x, base_weight, base_bias)
    if factor is not None:
        return add_dora_linear(
            result=result,
            x=x,
            base_weight=base_weight,
            base_bias=base_bias,
            weight_a=weight_a,
            weight_b=weight_b,
            factor=factor,
            scaling=scaling,
            dropout=dropout,
        )
    return add_lora_linear(
        result=result,
        x=x,
        weight_a=weight_a,
        weight_b=weight_b,
        bias_b=bias_b,
        scaling=scaling,
        dropout=dropout,
    )


def add_lora_linear(
    *,
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
    p = drop_probability(dropout)
    if fusable(x, result.dtype, weight_a) and dropout_fusable(x, p):
        return fused_linear(result, x, None, None, weight_a, weight_b, bias_b, None, scaling, p)
    hidden = F.linear(dropout(x.to(weight_a.dtype)), weight_a) * scaling
    bias = bias_b * scaling if bias_b is not None else None
    return result + F.linear(hidden, weight_b, bias).to(result.dtype)


def add_lora_linear_(
    *,
    result: torch.Tensor,
    x: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor | None,
    scaling: float,
) -> None:
    """`result += scaling * (B A x + bias_b)` in place, for inference (no autograd, no dropout);
    `result` may be a view (rows of a batch). Same shapes as `add_lora_linear`; dtypes `fusable`."""
    flat_result = result.view(-1, result.shape[-1])
    hidden = torch.mm(x.reshape(-1, x.shape[-1]), weight_a.to(x.dtype).t()).mul_(scaling)
    flat_result.addmm_(hidden, weight_b.to(x.dtype).t())
    if bias_b is not None:
        flat_result.add_(bias_b.to(x.dtype), alpha=scaling)


def add_lora_embedding(
    *,
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
    *,
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


def add_dora_linear(
    *,
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
    if drop_probability(dropout) == 0 and fusable(x, result.dtype, weight_a):
        return fused_linear(result, x, None, base_bias, weight_a, weight_b, None, factor, scaling, 0.0)
    dropped = dropout(x.to(weight_a.dtype))
    lora = F.linear(F.linear(dropped, weight_a) * scaling, weight_b)
    if drop_probability(dropout) > 0:
        base_wx = F.linear(dropped.to(base_weight.dtype), base_weight)
    else:
        base_wx = result if base_bias is None else result - base_bias
    return result + ((factor - 1) * base_wx.to(factor.dtype) + factor * lora).to(result.dtype)


def add_dora_embedding(
    *,
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
    *,
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
    if drop_probability(dropout) > 0:
        base_wx = base._conv_forward(dropped.to(base.weight.dtype), base.weight, None)
    else:
        base_wx = result if base.bias is None else result - base.bias.view(view)
    f = factor.view(view)
    return result + ((f - 1) * base_wx.to(f.dtype) + f * lora).to(result.dtype)
