"""LoRA initialisation strategies as pure functions on tensors (no module state).

Conventions shared by every function here:

- `weight` is the base weight in `(out_features, in_features)` layout; a caller whose layer stores
  it transposed (`fan_in_fan_out`, transformers' `Conv1D`) transposes before and after.
- `A` is `(r, in_features)`, `B` is `(out_features, r)` and the adapter adds `scaling * B @ A`.
- The "mutating" inits (PiSSA, OLoRA) move part of `W` into the adapter and return the residual
  base weight `new_weight = W - scaling * B @ A`, so the model computes the same function at step 0.
  They compute in float32 (float64 for a float64 weight); `A` and `B` come back in that compute
  dtype, `new_weight` in the input's dtype (for half precision, `new_weight + scaling * B @ A`
  therefore equals `W` up to the rounding of one cast).
- The rank-preserving conversion of a trained mutated adapter to a plain LoRA adapter (PEFT's
  `path_initial_model_for_weight_conversion`) is `convert_to_plain_lora` with
  `converted_rank_and_alpha`.
"""

from __future__ import annotations

import math

import torch

# Extra sketch directions of the randomized SVD: with r + 4 of them the power iterations converge at
# the rate of sigma_{r+5} / sigma_r instead of PEFT's sigma_{r+1} / sigma_r (Halko et al. 2011,
# sec. 4.2); the measured accuracy and cost of r + 4 against r and r + 8 are in benchmarks/README.md.
_OVERSAMPLING = 4


def pissa_init(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    niter: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: put the top-r singular directions of `W` into the adapter (Meng et al. 2024, arXiv:2404.02948).

    With the truncated SVD `W ~= U_r diag(S_r) V_r^T`:
    `A = diag(sqrt(S_r / scaling)) V_r^T`, `B = U_r diag(sqrt(S_r / scaling))` (the singular values
    are split evenly between the factors, so `A A^T = B^T B = diag(S_r / scaling)`) and
    `scaling * B @ A = U_r diag(S_r) V_r^T` is the best rank-r approximation of `W`.

    Args:
        weight: `(out_features, in_features)` floating-point base weight; not modified.
        r: adapter rank, `1 <= r <= min(out_features, in_features)`.
        scaling: the adapter's scaling (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA); must be > 0.
        niter: None for the exact SVD (`init_lora_weights="pissa"`); an integer N >= 0 for a
            randomized SVD with N power iterations ("pissa_niter_N"), much faster on large matrices.
            It sketches `r + 4` directions (PEFT's `svd_lowrank(W, r, niter)` sketches only `r`), so
            its rank-r part is closer to the exact one than PEFT's at the same N.
        generator: random source of the randomized SVD's Gaussian sketch (on `weight`'s device);
            None uses the global RNG. Unused when `niter` is None.

    Returns:
        `(A, B, new_weight)`: `A` `(r, in_features)` and `B` `(out_features, r)` in the compute dtype,
        `new_weight = W - scaling * B @ A` `(out_features, in_features)` in `weight`'s dtype.

    Raises:
        TypeError: `weight` is not a floating-point tensor.
        ValueError: `weight` is not 2-D, `r` is out of range, `scaling <= 0` or `niter < 0`.
    """
    matrix = _as_compute_matrix(weight, r, "pissa_init")
    if not scaling > 0:
        raise ValueError(
            f"pissa_init needs scaling > 0 (it takes sqrt(S / scaling)), got scaling={scaling}; "
            "check lora_alpha, which must be positive."
        )
    if niter is None:
        left, singular_values, right_h = _exact_svd(matrix, r)
    else:
        if niter < 0:
            raise ValueError(
                f"pissa_init needs niter >= 0 power iterations (or None for the exact SVD), got {niter}."
            )
        left, singular_values, right_h = _randomized_svd(matrix, r, niter, generator)
    root = torch.sqrt(singular_values / scaling)
    lora_a = root[:, None] * right_h
    lora_b = left * root[None, :]
    new_weight = torch.addmm(matrix, lora_b, lora_a, alpha=-scaling).to(weight.dtype)
    return lora_a, lora_b, new_weight


def olora_init(
    weight: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: start the adapter from the first r columns of a QR factorisation of `W`
    (Büyükakyüz 2024, arXiv:2406.01775).

    With the reduced QR `W = Q R` (Householder, `torch.linalg.qr`): `B = Q[:, :r]` (orthonormal
    columns), `A = R[:r, :]` (upper triangular), `new_weight = W - scaling * B @ A`.

    The scaling is not folded into `A` or `B`: the adapter removes `scaling * Q_r R_r` from `W`, not
    `Q_r R_r`. This is what PEFT 0.21.2 stores for `init_lora_weights="olora"` (checked by running it
    with `lora_alpha != r`), so adapter files trained from either library interoperate; the two
    readings only coincide at `scaling == 1`. The signs agree with PEFT's too: both factorise the same
    float32 matrix with `torch.linalg.qr`.

    Args:
        weight: `(out_features, in_features)` floating-point base weight; not modified.
        r: adapter rank, `1 <= r <= min(out_features, in_features)`.
        scaling: the adapter's scaling (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA).

    Returns:
        `(A, B, new_weight)`: `A` `(r, in_features)` and `B` `(out_features, r)` in the compute dtype,
        `new_weight` `(out_features, in_features)` in `weight`'s dtype.

    Raises:
        TypeError: `weight` is not a floating-point tensor.
        ValueError: `weight` is not 2-D or `r` is out of range.
    """
    matrix = _as_compute_matrix(weight, r, "olora_init")
    orthonormal, triangular = torch.linalg.qr(matrix, mode="reduced")
    lora_b = orthonormal[:, :r].contiguous()
    lora_a = triangular[:r].contiguous()
    new_weight = (matrix - scaling * (lora_b @ lora_a)).to(weight.dtype)
    return lora_a, lora_b, new_weight


def gaussian_a(r: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PEFT's `init_lora_weights="gaussian"` for A: entries ~ N(0, std=1/r) (B starts at zero).

    Args:
        r: adapter rank (>= 1); the standard deviation is `1 / r`, not `1 / sqrt(r)`.
        in_features: the adapted layer's input size.
        generator: CPU random source; None uses the global RNG.

    Returns:
        `A`, float32 `(r, in_features)` on the CPU (copy it into the parameter to cast and move it).

    Raises:
        ValueError: `r < 1` or `in_features < 1`.
    """
    if r < 1 or in_features < 1:
        raise ValueError(
            f"gaussian_a needs r >= 1 and in_features >= 1, got r={r}, in_features={in_features}."
        )
    return torch.randn(r, in_features, generator=generator) / r


def convert_to_plain_lora(
    a0: torch.Tensor, b0: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a trained PiSSA/OLoRA adapter into a plain LoRA adapter for the original weight `W`.

    A mutated init trains against the residual `W_res = W - s B0 A0`. After training,
    `W_res + s B1 A1 = W + s (B1 A1 - B0 A0) = W + s B' A'` with `A' = [A1; A0]` (rows stacked) and
    `B' = [B1 | -B0]` (columns stacked), so the result, of rank 2r, applies to the untouched `W` with
    the same scaling `s` (use `converted_rank_and_alpha` for its config). The order (trained factors
    first) is PEFT's, so converted files are identical.

    Args:
        a0, b0: the adapter at initialisation, `(r, in_features)` and `(out_features, r)`.
        a1, b1: the same adapter after training, same shapes.

    Returns:
        `(A', B')`: `(2r, in_features)` and `(out_features, 2r)`.

    Raises:
        ValueError: the shapes do not match as above.
    """
    if (
        a0.shape != a1.shape
        or b0.shape != b1.shape
        or a0.dim() != 2
        or b0.dim() != 2
        or a0.shape[0] != b0.shape[1]
    ):
        raise ValueError(
            "convert_to_plain_lora needs a0, a1 of shape (r, in_features) and b0, b1 of shape (out_features, r), "
            f"got a0 {tuple(a0.shape)}, b0 {tuple(b0.shape)}, a1 {tuple(a1.shape)}, b1 {tuple(b1.shape)}; "
            "pass the initial adapter as (a0, b0) and the trained one as (a1, b1)."
        )
    return torch.cat([a1, a0], dim=0), torch.cat([b1, -b0], dim=1)


def converted_rank_and_alpha(r: int, alpha: float, use_rslora: bool) -> tuple[int, float]:
    """Rank and alpha of the adapter made by `convert_to_plain_lora`, keeping its scaling unchanged.

    The rank doubles. Plain LoRA scales by `alpha / r`, so alpha doubles too; rsLoRA scales by
    `alpha / sqrt(r)`, so alpha grows by `sqrt(2)` only. Apply it entry by entry to `rank_pattern`
    (take the rank) and `alpha_pattern` (take the alpha) as well.

    PEFT 0.21.2 does the same for the top-level `r`/`lora_alpha` (checked by running
    `save_pretrained(..., path_initial_model_for_weight_conversion=...)` with `use_rslora=True`:
    `lora_alpha` 16 -> 22.63 for r 4 -> 8, outputs preserved), but it doubles every `alpha_pattern`
    entry regardless of rsLoRA, and therefore refuses `use_rslora` together with a rank or alpha
    pattern (ValueError). Here that combination is supported and keeps every layer's scaling.

    Args:
        r: the mutated adapter's rank (>= 1).
        alpha: its `lora_alpha`.
        use_rslora: whether the scaling is `alpha / sqrt(r)` (True) or `alpha / r` (False).

    Returns:
        `(2 * r, alpha')` with `alpha' = 2 * alpha` (plain) or `sqrt(2) * alpha` (rsLoRA).

    Raises:
        ValueError: `r < 1`.
    """
    if r < 1:
        raise ValueError(f"converted_rank_and_alpha needs r >= 1, got r={r}.")
    return 2 * r, alpha * (math.sqrt(2) if use_rslora else 2)


def _as_compute_matrix(weight: torch.Tensor, r: int, caller: str) -> torch.Tensor:
    """`weight` in float32 (float64 stays float64), after checking its shape, dtype and `r`."""
    if not weight.is_floating_point():
        raise TypeError(
            f"{caller} needs a floating-point weight, got dtype {weight.dtype}; dequantize it first."
        )
    if weight.dim() != 2:
        raise ValueError(
            f"{caller} needs a 2-D (out_features, in_features) weight, got shape {tuple(weight.shape)}; "
            "flatten a convolution weight to (out_channels, -1) first."
        )
    if not 1 <= r <= min(weight.shape):
        raise ValueError(
            f"{caller} needs 1 <= r <= min(out_features, in_features) = {min(weight.shape)} "
            f"for a weight of shape {tuple(weight.shape)}, got r={r}; lower r."
        )
    compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.detach().to(compute_dtype)


def _exact_svd(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r `(U, S, V^T)` of `matrix` `(m, n)` from the full thin SVD.

    A wide matrix is decomposed through its transpose (`W^T = V S U^T`), which LAPACK's divide and
    conquer runs faster (timings in benchmarks/README.md), with the same singular values and
    vectors up to sign.
    """
    if matrix.shape[0] < matrix.shape[1]:
        right, singular_values, left_h = torch.linalg.svd(matrix.T, full_matrices=False)
        return left_h[:r].T, singular_values[:r], right[:, :r].T
    left, singular_values, right_h = torch.linalg.svd(matrix, full_matrices=False)
    return left[:, :r], singular_values[:r], right_h[:r]


def _randomized_svd(
    matrix: torch.Tensor, r: int, niter: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r `(U, S, V^T)` of `matrix` `(m, n)` by randomized subspace iteration with `niter` power
    iterations (Halko, Martinsson, Tropp 2011, algorithms 4.4 and 5.1).

    One power iteration is `Q <- orth(W W^T Q)` on `width = r + _OVERSAMPLING` directions. The basis
    `Q` is kept as orthonormal rows `(width, m)`, so every product is `rows @ W` or `rows @ W^T`, which
    BLAS runs about twice as fast as `W^T @ columns` (MKL, one thread, width 16-26: 70-80 against
    35-40 GFLOP/s). Orthonormalising once per iteration rather than after each of its two products
    (5 QRs instead of 9 at niter=4) kept the result as accurate as float32's exact SVD in our checks:
    top-16 singular values to ~1e-5 relative with sigma_16 / sigma_1 down to 1e-5.
    """
    width = min(r + _OVERSAMPLING, *matrix.shape)
    sketch = torch.randn(
        width, matrix.shape[1], generator=generator, dtype=matrix.dtype, device=matrix.device
    )
    left_basis = _orthonormal_rows(sketch @ matrix.T)
    for _ in range(niter):
        left_basis = _orthonormal_rows((left_basis @ matrix) @ matrix.T)
    # Rayleigh-Ritz on the (width, n) projection Q^T W, through its tall transpose: Q^T W = U' S V^T
    right, singular_values, small_left_h = torch.linalg.svd((left_basis @ matrix).T, full_matrices=False)
    return left_basis.T @ small_left_h[:r].T, singular_values[:r], right[:, :r].T


def _orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the rows of `rows` `(k, d)`, `k <= d`: the Householder QR of the
    column-major view `rows.T`, whose `Q.T` comes back row-major (no transposing copy either way)."""
    return torch.linalg.qr(rows.T).Q.T
