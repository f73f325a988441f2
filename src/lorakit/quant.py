"""Blockwise absmax quantization (NormalFloat and uniform codebooks) and LoftQ initialisation.

Pure tensor functions, no module state; they run on whatever device the input lives on.

- `nf_codebook(bits)`: the NormalFloat levels of QLoRA (Dettmers et al. 2023, arXiv:2305.14314).
- `quantize(weight, ...)` / `dequantize(q)`: split the flattened weight into blocks of `block_size`
  values, divide each block by its absolute maximum and round every value to the nearest level of
  a codebook in [-1, 1]; dequantization is `absmax[block] * codebook[code]`.
- `loftq_init(weight, r, scaling, ...)`: LoftQ (Li et al. 2023, arXiv:2310.08659, Algorithm 1),
  a quantized base Q and LoRA factors A, B chosen so that `Q + scaling * B @ A` is close to W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("nf", "uniform")
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantizedTensor:
    """A blockwise-quantized tensor: what `quantize` returns and `dequantize` reads.

    Attributes:
        codes: uint8, shape (num_blocks, block_size); index of each value's codebook level, one code
            per byte (not bit-packed). The last block is padded with zeros when `numel` is not a
            multiple of `block_size`.
        absmax: float32, shape (num_blocks,); each block's largest absolute value (its scale).
        shape: the original tensor's shape.
        dtype: the original tensor's dtype (what `dequantize` returns).
        method: "nf" (NormalFloat levels) or "uniform" (evenly spaced levels).
        bits: bits per code; the codebook has 2**bits levels.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    method: str
    bits: int

    @property
    def block_size(self) -> int:
        return self.codes.shape[1]


def nf_codebook(bits: int = 4, device: torch.device | str | None = None) -> torch.Tensor:
    """The 2**bits NormalFloat levels: quantiles of N(0, 1) rescaled to [-1, 1], sorted, float32.

    QLoRA's asymmetric construction, which gives an exact zero: with k = bits and Phi^-1 the
    normal quantile function (`torch.special.ndtri`),

        offset   = 1 - (1 / (2 (2^k - 1)) + 1 / (2 * 2^k)) / 2          (0.9677083 for k = 4)
        positive = Phi^-1(p) for p in linspace(offset, 1/2, 2^(k-1) + 1), 1/2 (zero) included
        negative = -Phi^-1(p) for p in linspace(offset, 1/2, 2^(k-1)), 1/2 (zero) dropped

    i.e. 2^(k-1) levels on the negative side and 2^(k-1) + 1 on the positive side, sharing the
    zero; all are divided by Phi^-1(offset) so the endpoints are exactly -1 and 1. The offset keeps
    the outermost quantile finite. For k = 4 these are the published NF4 values; for other k the
    same construction is applied (no published reference exists).

    Args:
        bits: code width k, 2..8.
        device: where to put the result (built in float64 on the CPU, then cast).

    Returns:
        Tensor of shape (2**bits,), float32, ascending, containing -1, 0 and 1 exactly.
    """
    _check_bits(bits)
    half = 2 ** (bits - 1)
    offset = 1 - (1 / (2 * (2**bits - 1)) + 1 / (2 * 2**bits)) / 2
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64))
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, positive]).sort().values
    levels[half - 1] = 0.0  # ndtri(0.5) is 0 up to rounding; make the shared zero exact
    levels = levels / levels[-1]  # the negative end is exactly -Phi^-1(offset), so it becomes -1
    return levels.to(dtype=torch.float32, device=device)


def uniform_codebook(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """2**bits evenly spaced levels from -1 to 1, both ends included: -1 + 2 i / (2**bits - 1).

    Symmetric, so an even number of levels has no exact zero (the two nearest are +-1/(2**bits - 1)).

    Returns:
        Tensor of shape (2**bits,), float32, ascending.
    """
    _check_bits(bits)
    return torch.linspace(-1.0, 1.0, 2**bits, dtype=torch.float32, device=device)


def quantize(
    weight: torch.Tensor, bits: int = 4, method: str = "nf", block_size: int = 64
) -> QuantizedTensor:
    """Blockwise absmax quantization of `weight` to 2**bits levels per value.

    With x the flattened weight, zero-padded to a multiple of `block_size` and viewed as blocks
    x_b of `block_size` values, m_b = max |x_b| and c the codebook (`nf_codebook(bits)` or
    `uniform_codebook(bits)`):

        code_i = argmin_j |x_i / m_b - c_j|        (ties go to the lower level)

    computed with `torch.bucketize` on the midpoints between levels, which needs no
    (numel, 2**bits) distance matrix. An all-zero block (m_b = 0) is divided by 1 instead, and
    dequantizes to zeros. Computation is in float32 whatever the input dtype.

    Args:
        weight: floating tensor of any shape, finite.
        bits: 2..8, for both methods (NF for bits != 4 uses the same construction as NF4).
        method: "nf" (NormalFloat, suited to normally distributed weights) or "uniform".
        block_size: values per absmax scale, >= 1.

    Returns:
        A `QuantizedTensor` with codes of shape (ceil(numel / block_size), block_size).

    Raises:
        ValueError: bad `bits`, `method` or `block_size`; non-floating or non-finite `weight`.
    """
    _check_bits(bits)
    if method not in METHODS:
        raise ValueError(f"quantize: method={method!r} is not supported; use one of {METHODS}.")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"quantize: block_size={block_size!r} must be a positive int, e.g. 64.")
    if not weight.is_floating_point():
        raise ValueError(
            f"quantize: weight has dtype {weight.dtype}; pass a floating tensor (e.g. weight.float())."
        )
    blocks = _to_blocks(weight.detach().float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("quantize: weight contains inf or nan; quantize only finite tensors.")
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    levels = _codebook(method, bits, blocks.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(blocks / scale[:, None], midpoints, out_int32=True)
    return QuantizedTensor(
        codes=codes.to(torch.uint8),
        absmax=absmax,
        shape=weight.shape,
        dtype=weight.dtype,
        method=method,
        bits=bits,
    )


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Rebuild the tensor `q` stands for: value_i = absmax[block of i] * codebook[code_i].

    Returns:
        Tensor of shape `q.shape` and dtype `q.dtype`, on the device of `q.codes`.
    """
    levels = _codebook(q.method, q.bits, q.codes.device)
    values = levels[q.codes.long()] * q.absmax[:, None]
    return values.flatten()[: math.prod(q.shape)].reshape(q.shape).to(q.dtype)


def loftq_init(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    bits: int = 4,
    iters: int = 1,
    method: str = "nf",
    block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ: a quantized base and LoRA factors that together approximate `weight`.

    Alternates T = `iters` times (Li et al. 2023, Algorithm 1), starting from B A = 0:

        Q     = dequantize(quantize(W - scaling * B @ A))
        U S V^T = svd(W - Q)
        B     = U[:, :r] sqrt(S[:r]) / sqrt(scaling),   A = sqrt(S[:r]) V^T[:r] / sqrt(scaling)

    so that `scaling * B @ A` is the best rank-r approximation of W - Q (Eckart-Young) with the
    singular values split evenly between the factors. Uses a full SVD; everything is float32.

    Re-quantizing `W - scaling * B A` moves the block scales, so an iteration can raise the error
    (measured at 2-3 bits; at 4 bits it fell every time). The paper and PEFT return the last
    iterate; this returns the best one, so more `iters` never makes the weight error larger.

    Args:
        weight: (out_features, in_features), any floating dtype.
        r: LoRA rank, 1..min(out_features, in_features).
        scaling: the LoRA scaling the model will apply (lora_alpha / r), > 0.
        bits, method, block_size: passed to `quantize`.
        iters: number of alternating steps T, >= 1.

    Returns:
        (Q, lora_A, lora_B), float32 on `weight`'s device: Q (out, in) is the dequantized base the
        model holds, lora_A (r, in), lora_B (out, r).

    Raises:
        ValueError: `weight` not 2-D, `r` out of range, `scaling` <= 0, `iters` < 1, or any
            `quantize` argument error.
    """
    if weight.dim() != 2:
        raise ValueError(f"loftq_init: weight must be 2-D (out, in); got shape {tuple(weight.shape)}.")
    out_features, in_features = weight.shape
    if not 1 <= r <= min(out_features, in_features):
        raise ValueError(
            f"loftq_init: r={r} must be in 1..{min(out_features, in_features)} for a weight of shape "
            f"{tuple(weight.shape)}; lower r."
        )
    if not scaling > 0:
        raise ValueError(f"loftq_init: scaling={scaling} must be > 0 (it is lora_alpha / r).")
    if iters < 1:
        raise ValueError(f"loftq_init: iters={iters} must be >= 1 (1 is LoftQ's usual choice).")
    target = weight.detach().float()
    low_rank = torch.zeros_like(target)
    best: tuple[float, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for _ in range(iters):
        base = dequantize(quantize(target - low_rank, bits=bits, method=method, block_size=block_size))
        lora_a, lora_b = _balanced_rank_r_factors(target - base, r, scaling)
        low_rank = scaling * (lora_b @ lora_a)
        error = torch.linalg.norm(target - base - low_rank).item()
        if best is None or error < best[0]:
            best = (error, base, lora_a, lora_b)
    return best[1], best[2], best[3]


def loftq_weight_error(
    weight: torch.Tensor, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> float:
    """Relative Frobenius error of the adapted weight: ||W - (Q + scaling B A)||_F / ||W||_F.

    Args:
        weight, q: (out, in). a: (r, in). b: (out, r). Computed in float32.
    """
    weight = weight.detach().float()
    approx = q.detach().float() + scaling * (b.detach().float() @ a.detach().float())
    return (torch.linalg.matrix_norm(weight - approx) / torch.linalg.matrix_norm(weight)).item()


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bits={bits!r} is not supported; use an int from {MIN_BITS} to {MAX_BITS} (e.g. 4)."
        )


def _codebook(method: str, bits: int, device: torch.device) -> torch.Tensor:
    return nf_codebook(bits, device) if method == "nf" else uniform_codebook(bits, device)


def _to_blocks(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten, zero-pad to a multiple of block_size, view as (num_blocks, block_size)."""
    flat = values.flatten()
    padding = -flat.numel() % block_size
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return flat.view(-1, block_size)


def _balanced_rank_r_factors(
    residual: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with scaling * B @ A = the rank-r truncated SVD of residual (out, in)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = (s[:r] / scaling).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root
