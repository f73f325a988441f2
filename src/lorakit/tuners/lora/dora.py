"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

The adapted weight is `W' = m * V / ||V||` with direction `V = W + scaling * B A` and a trained
magnitude `m`, one value per output row. The norm is detached (the paper's section 4.3), so it
costs no backward memory and `m` alone carries the magnitude gradient.

Layouts: every function takes the weight as (rows, ...) where each row has its own magnitude:
(out, in) for Linear and Conv1D (after transposing fan_in_fan_out), (embedding_dim, num_embeddings)
for Embedding (the transposed table, as PEFT keeps it), (out, in, *kernel) for ConvNd.
"""

from __future__ import annotations

import torch
from torch import nn


def row_norm(direction: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row: (rows, ...) -> (rows,)."""
    return direction.flatten(1).norm(p=2, dim=1)


def dora_factor(magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`m / ||W + delta||` per row, shape (rows,); the norm is detached, the magnitude is not.

    Args:
        magnitude: (rows,) trained magnitudes.
        weight: base weight, (rows, ...). delta: `scaling * B A` in the same layout.
    """
    with torch.no_grad():
        norm = row_norm(weight + delta.to(weight.dtype)).to(magnitude.dtype)
    return magnitude / norm


class MagnitudeVector(nn.Module):
    """Holds one adapter's magnitude as `.weight` (PEFT's in-memory name
    `lora_magnitude_vector.<adapter>.weight`; saved as `lora_magnitude_vector`).

    Args:
        shape: (rows,) for Linear/Conv1D/Embedding, (1, out, 1, ...) for ConvNd, as PEFT stores it.
    """

    def __init__(self, shape: tuple[int, ...], factory: dict) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, **factory))

    def rows(self) -> torch.Tensor:
        """The magnitudes as a flat (rows,) tensor (a view: gradients flow to `weight`)."""
        return self.weight.reshape(-1)
