"""Adapter-merging algorithms as pure functions on tensors (no modules, no model state).

A *task tensor* is one adapter's contribution (a LoRA factor or a full weight change); every
combination function takes a list of task tensors of one shape and a 1-D tensor of weights, one per
task tensor, and returns one tensor of that shape:

- `task_arithmetic`: `sum_i w_i t_i` (Ilharco et al., 2022, arXiv:2212.04089).
- `magnitude_prune`: keep each `t_i`'s largest-magnitude entries, then `sum_i w_i t_i`.
- `ties`: TIES-merging (Yadav et al., 2023, arXiv:2306.01708): trim each `t_i` to its top-`density`
  entries by magnitude, elect a sign per entry, average the entries that agree with it.
- `dare_linear` / `dare_ties`: DARE (Yu et al., 2023, arXiv:2311.03099): drop each entry with
  probability `1 - density` and rescale the survivors by `1 / density` (so the expectation is
  unchanged), then `sum_i w_i t_i` or TIES' elect-and-average.

Conventions (PEFT 0.21.2's, except where marked):
- The sign election uses the trimmed task tensors *before* weighting; weights only scale what is
  averaged. A negative weight is a negated task tensor (`ties([t], [-w]) == ties([-t], [w])`), so it
  joins the election with its sign flipped (PEFT elects on the un-negated tensor; the results agree
  for weights >= 0). A zero weight removes its task tensor from the election and the average.
- `density` is the fraction kept; `magnitude` keeps `int(density * numel)` entries.

The SVD helpers give the top-k SVD of a weighted sum of low-rank products `sum_i w_i B_i A_i`
from the factors alone (QR of the stacked factors; the dense sum is never formed), and of a dense
matrix, with a fixed sign per singular pair so results are reproducible.
"""

from __future__ import annotations

from typing import Literal

import torch

SignMethod = Literal["total", "frequency"]


# ---- operators on one tensor --------------------------------------------------------------------
def prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the `int(density * numel)` entries of largest absolute value (TIES' "trim").

    Args:
        tensor: any shape.
        density: fraction of entries kept, in (0, 1]; 1 returns `tensor` unchanged.
    """
    _check_density(density)
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(keep, sorted=False).indices] = 1  # the set is what matters; unsorted is faster
    return tensor * mask.view_as(tensor)


def prune_randomly(
    tensor: torch.Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE's drop: keep each entry independently with probability `density`, zero the rest, and
    (with `rescale`) divide the survivors by `density`, so that `E[result] == tensor`.

    Args:
        tensor: any shape.
        density: keep probability in (0, 1]; 1 returns `tensor` unchanged (no random draw).
        generator: random source; the global one when None (PEFT's choice).
    """
    _check_density(density)
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    kept = tensor * keep
    return kept / density if rescale else kept


def elect_sign(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """TIES' sign election: per entry, +1 or -1, the sign that wins across the task tensors.

    Args:
        stacked: (n, ...) task tensors stacked on dim 0.
        method: "total" (the sign of the sum of values: mass decides) or "frequency" (the sign of
            the sum of signs: the head count decides). Ties go to +1.
    Returns:
        (...) tensor of +1/-1 in `stacked`'s dtype.
    """
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = stacked.sign().sum(dim=0)
    else:
        raise ValueError(
            f"majority_sign_method={method!r} is not a sign election; use 'total' or 'frequency'."
        )
    return torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(weighted: torch.Tensor, agrees: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint merge: per entry, the mean over the task tensors whose entry agrees with the
    elected sign (entries no tensor agrees with stay 0).

    Args:
        weighted: (n, ...) weighted task tensors.
        agrees: (n, ...) bool, True where a task tensor's sign equals the elected sign.
    """
    total = (weighted * agrees).sum(dim=0)
    count = agrees.sum(dim=0).clamp(min=1)
    return total / count


# ---- combinations of task tensors ---------------------------------------------------------------
def task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """`sum_i weights[i] * tensors[i]`; tensors share one shape, weights is (n,)."""
    stacked = torch.stack(tensors)
    return (stacked * _per_tensor(weights, stacked)).sum(dim=0)


def magnitude_prune(tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Trim each task tensor to its top-`density` entries by magnitude, then take the weighted sum."""
    return task_arithmetic([prune_by_magnitude(t, density) for t in tensors], weights)


def dare_linear(tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE drop-and-rescale on each task tensor, then the weighted sum (unbiased: the expectation
    is `task_arithmetic(tensors, weights)`)."""
    return task_arithmetic([prune_randomly(t, density) for t in tensors], weights)


def ties(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    """TIES-merging: trim to the top-`density` magnitudes, elect signs, average the agreeing entries.

    Args:
        tensors: n task tensors of one shape.
        weights: (n,); |w_i| scales tensor i in the average, sign(w_i) negates it (see module doc).
        density: fraction of each task tensor kept by the trim, in (0, 1].
        majority_sign_method: "total" or "frequency" (see `elect_sign`).
    """
    return _elect_and_average(
        [prune_by_magnitude(t, density) for t in tensors], weights, majority_sign_method
    )


def dare_ties(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    """TIES with DARE's random drop-and-rescale in place of the magnitude trim."""
    return _elect_and_average([prune_randomly(t, density) for t in tensors], weights, majority_sign_method)


def _elect_and_average(
    tensors: list[torch.Tensor], weights: torch.Tensor, method: SignMethod
) -> torch.Tensor:
    stacked = torch.stack(tensors)
    signs = _per_tensor(weights.sign(), stacked)
    oriented = stacked * signs  # a negative weight negates its task tensor; a zero weight removes it
    elected = elect_sign(oriented, method)
    agrees = oriented.sign() == elected
    return disjoint_mean(oriented * _per_tensor(weights.abs(), stacked), agrees)


def _per_tensor(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """(n,) weights shaped (n, 1, ..., 1) to broadcast over (n, ...) stacked tensors."""
    weights = weights.to(device=stacked.device, dtype=stacked.dtype)
    return weights.view((-1,) + (1,) * (stacked.dim() - 1))


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density={density!r} must be in (0, 1]: the fraction of entries kept.")


# ---- SVD ------------------------------------------------------------------------------------------
def svd_of_factor_sum(
    factors_b: list[torch.Tensor],
    factors_a: list[torch.Tensor],
    weights: torch.Tensor,
    driver: str | None = None,
    rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of `M = sum_i weights[i] * B_i @ A_i` without forming M.

    With `B = [B_1 ... B_n]` (m, R) and `A = [w_1 A_1; ...; w_n A_n]` (R, k), `R = sum r_i`, take
    `B = Q_b R_b` and `A^T = Q_a R_a` (reduced QR); then `M = Q_b (R_b R_a^T) Q_a^T` and the SVD of
    the small core `R_b R_a^T = U_c S V_c^T` gives `M = (Q_b U_c) S (Q_a V_c)^T`. Cost
    O((m + k) R^2 + R^3) instead of O(m k min(m, k)).

    Args:
        factors_b: B_i, each (m, r_i).
        factors_a: A_i, each (r_i, k).
        weights: (n,) w_i.
        driver: `torch.linalg.svd` driver for the core (CUDA only).
        rank: keep only the leading `rank` singular triplets (default: all).
    Returns:
        U (m, t), S (t,), Vh (t, k) with t = min(m, k, R, rank), singular values descending and
        each pair's sign fixed by `canonical_signs`.
    """
    stacked_b = torch.cat(factors_b, dim=1)
    stacked_a = torch.cat([a * w for a, w in zip(factors_a, weights.to(stacked_b).unbind())], dim=0)
    q_b, r_b = torch.linalg.qr(stacked_b)
    q_a, r_a = torch.linalg.qr(stacked_a.T)
    u_core, singular, vh_core = torch.linalg.svd(r_b @ r_a.T, full_matrices=False, driver=driver)
    u_core, singular, vh_core = u_core[:, :rank], singular[:rank], vh_core[:rank]
    return canonical_signs(q_b @ u_core, singular, vh_core @ q_a.T)


def svd(matrix: torch.Tensor, driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a dense (m, k) matrix with `canonical_signs`; `driver` as in `torch.linalg.svd`."""
    u, singular, vh = torch.linalg.svd(matrix, full_matrices=False, driver=driver)
    return canonical_signs(u, singular, vh)


def canonical_signs(
    u: torch.Tensor, singular: torch.Tensor, vh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fix the sign of each singular pair: the largest-magnitude entry of each column of `u` is
    made positive (`vh`'s matching row flips with it, so `u diag(s) vh` is unchanged).

    SVD routines leave that sign free; `svd_clamp` (a quantile of the signed entries) depends on
    it, so a fixed convention makes results reproducible across SVD methods and devices.
    Args:
        u: (m, t); singular: (t,); vh: (t, k).
    """
    rows = u.abs().argmax(dim=0)
    flips = u.gather(0, rows.unsqueeze(0)).squeeze(0).sign()
    flips = torch.where(flips == 0, torch.ones_like(flips), flips)
    return u * flips, singular, vh * flips.unsqueeze(1)


def low_rank_factors(
    u: torch.Tensor, singular: torch.Tensor, vh: torch.Tensor, rank: int, clamp: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of the best rank-`rank` approximation: `B = U_k diag(S_k)`, `A = Vh_k`.

    Args:
        u, singular, vh: a thin SVD, (m, t), (t,), (t, k).
        rank: components kept (all t when t <= rank; the caller pads).
        clamp: quantile q in [0, 1]: with `hi` the q-quantile of the entries of B and A together,
            both are clamped to [-hi, hi] (PEFT's `svd_clamp`, after kohya-ss' sd-scripts).
    Returns:
        B (m, min(rank, t)), A (min(rank, t), k).
    """
    b = u[:, :rank] * singular[:rank]
    a = vh[:rank]
    if clamp is not None:
        hi = quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return b, a


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a 1-D tensor with linear interpolation (`torch.quantile`'s default), for
    any size (`torch.quantile` refuses inputs over 2**24 entries)."""
    if not 0 <= q <= 1:
        raise ValueError(f"svd_clamp={q!r} must be a quantile in [0, 1], e.g. 0.99.")
    ordered = values.reshape(-1).sort().values
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
