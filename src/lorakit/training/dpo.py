"""Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290) with a free reference.

The loss of one pair, with pi the trained model and pi_ref the reference:

    r_w = beta * (log pi(y_w | x) - log pi_ref(y_w | x)),  r_l = beta * (log pi(y_l | x) - log pi_ref(y_l | x))
    loss = -log sigmoid(r_w - r_l)

The reference is the same model with its adapters disabled (`PeftModel.disable_adapter()`), so no
second copy of the base model is held in memory; with B = 0 at initialisation the two start equal
and the first loss is log 2.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from ..peft_model import PeftModel
from .data import IGNORE_INDEX
from .trainer import LoraPlusTrainer


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over answer tokens of log p(token | prefix).

    Args:
        logits: (N, L, V) next-token logits.
        labels: (N, L) token ids, -100 where a token is not scored (prompt, padding).
    Returns:
        (N,) float32 log-probabilities.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    token_nll = F.cross_entropy(
        shifted_logits.transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -token_nll.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards r_w, r_l (all (B,); rewards detached)."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def pair_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen and rejected answers of a `DpoCollator` batch (B each)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = sequence_logprobs(logits, batch["labels"])
    return logprobs.chunk(2)


def reference_logprobs(
    peft_model: PeftModel, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pair_logprobs` of the reference: the base model, i.e. the same model with adapters disabled."""
    with torch.no_grad(), peft_model.disable_adapter():
        return pair_logprobs(peft_model, batch)


class DpoTrainer(LoraPlusTrainer):
    """`LoraPlusTrainer` whose loss is DPO's (see the module docstring).

    Args:
        beta: weight of the implicit KL term (TRL's default 0.1).
    Batches come from `DpoCollator`. Logged with the loss: `rewards/chosen`, `rewards/rejected`,
    `rewards/margins` (mean r_w - r_l) and `rewards/accuracies` (share of pairs with r_w > r_l).
    """

    def __init__(self, *args, beta: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta
        # The loss is a mean over pairs, not over tokens: let the Trainer average accumulated steps.
        self.model_accepts_loss_kwargs = False
        self._reward_logs: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy_chosen, policy_rejected = pair_logprobs(model, inputs)
        reference_chosen, reference_rejected = reference_logprobs(
            self.accelerator.unwrap_model(model), inputs
        )
        losses, chosen, rejected = dpo_loss(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.beta
        )
        if model.training:
            self._reward_logs["rewards/chosen"].append(chosen.mean().item())
            self._reward_logs["rewards/rejected"].append(rejected.mean().item())
            self._reward_logs["rewards/margins"].append((chosen - rejected).mean().item())
            self._reward_logs["rewards/accuracies"].append((chosen > rejected).float().mean().item())
        loss = losses.mean()
        if return_outputs:
            return loss, {"chosen_rewards": chosen, "rejected_rewards": rejected}
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update({k: sum(v) / len(v) for k, v in self._reward_logs.items() if v})
            self._reward_logs.clear()
        super().log(logs, *args, **kwargs)
