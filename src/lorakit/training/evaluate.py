"""Held-out metrics the `lorakit` command prints before and after training (eval mode, no gradients).

- classification: `accuracy` and mean cross-entropy `loss`;
- SFT: `completion_loss`, the mean negative log-likelihood per completion token;
- DPO: `reward_margin`, the mean of r_w - r_l over pairs, and `reward_accuracy`, the share of
  pairs with r_w > r_l (see `dpo.py`; both are 0 for the untrained model, whose policy is the
  reference).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .dpo import pair_logprobs, reference_logprobs, sequence_logprobs


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    task: str,
    examples: list[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int = 16,
    beta: float = 0.1,
) -> dict[str, float]:
    """Metrics of `model` (a `PeftModel`) on `examples` for `task`; the model's mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = {"a": 0.0, "b": 0.0, "n": 0.0}
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
            _accumulate(model, task, batch, totals, beta)
    finally:
        model.train(was_training)
    a, b, n = totals["a"], totals["b"], max(totals["n"], 1.0)
    if task == "classification":
        return {"accuracy": a / n, "loss": b / n}
    if task == "sft":
        return {"completion_loss": a / n}
    return {"reward_margin": a / n, "reward_accuracy": b / n}


def _accumulate(
    model, task: str, batch: dict[str, torch.Tensor], totals: dict[str, float], beta: float
) -> None:
    if task == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        totals["a"] += (logits.argmax(-1) == batch["labels"]).sum().item()
        totals["b"] += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        totals["n"] += len(batch["labels"])
    elif task == "sft":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        totals["a"] -= sequence_logprobs(logits, batch["labels"]).sum().item()
        totals["n"] += (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    else:
        policy_chosen, policy_rejected = pair_logprobs(model, batch)
        reference_chosen, reference_rejected = reference_logprobs(model, batch)
        margins = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
        totals["a"] += margins.sum().item()
        totals["b"] += (margins > 0).sum().item()
        totals["n"] += len(margins)
