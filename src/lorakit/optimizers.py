"""LoRA+ (Hayou et al., 2024, arXiv:2402.12354): B learns `loraplus_lr_ratio` times faster than A.

Same import path and signature as PEFT (`peft.optimizers.create_loraplus_optimizer`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .names import LORAPLUS_B_SIDE
from .tuners.lora.layer import Embedding


def loraplus_param_groups(
    model: nn.Module,
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+.

    Groups (only trainable parameters):
        - A matrices and every other 2-D trainable tensor: `lr`, weight decay.
        - B matrices, DoRA magnitudes and every 1-D trainable tensor (biases, norm weights):
          `lr * loraplus_lr_ratio`; weight decay only for B matrices, never for biases or norms.
        - Embedding adapters (`lora_embedding_A/B`): `loraplus_lr_embedding`, weight decay.
    Bottleneck adapters follow the same reasoning (LoRA+ speeds up the factor that starts at
    zero): the down-projection weight is an A (`lr`), the up-projection weight a B (`lr * ratio`,
    weight decay); their biases, the adapter's layer norm and a learned `adapter_scale` are 1-D
    (`lr * ratio`, no weight decay).
    Empty groups are left out.

    Raises:
        ValueError: no trainable parameter, or a non-positive `lr` / `loraplus_lr_ratio`.
    """
    if lr <= 0 or loraplus_lr_ratio <= 0:
        raise ValueError(f"lr={lr} and loraplus_lr_ratio={loraplus_lr_ratio} must both be > 0.")
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, Embedding) for p in m.lora_embedding_A.parameters()
    } | {id(p) for m in model.modules() if isinstance(m, Embedding) for p in m.lora_embedding_B.parameters()}
    no_decay = _no_decay_params(model)
    groups: dict[str, dict[str, Any]] = {
        "A": {"params": [], "lr": lr, "weight_decay": loraplus_weight_decay},
        "B": {"params": [], "lr": lr * loraplus_lr_ratio, "weight_decay": loraplus_weight_decay},
        "B_no_decay": {"params": [], "lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
        "embedding": {"params": [], "lr": loraplus_lr_embedding, "weight_decay": loraplus_weight_decay},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_params:
            groups["embedding"]["params"].append(param)
        elif _is_b_side(name) or param.dim() == 1:
            groups["B_no_decay" if id(param) in no_decay else "B"]["params"].append(param)
        else:
            groups["A"]["params"].append(param)
    chosen = [group for group in groups.values() if group["params"]]
    if not chosen:
        raise ValueError("The model has no trainable parameters; wrap it with get_peft_model first.")
    return chosen


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """Build `optimizer_cls` over LoRA+'s parameter groups (see `loraplus_param_groups`).

    Example:
        >>> optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    """
    if "weight_decay" in optimizer_kwargs:
        raise ValueError(
            "Pass loraplus_weight_decay=... instead of weight_decay=...: LoRA+ sets weight decay per group "
            "(never on biases and norms)."
        )
    groups = loraplus_param_groups(
        model,
        lr=lr,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_lr_embedding=loraplus_lr_embedding,
        loraplus_weight_decay=loraplus_weight_decay,
    )
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)


def _is_b_side(name: str) -> bool:
    parts = name.split(".")
    return any(p in LORAPLUS_B_SIDE for p in parts)


def _no_decay_params(model: nn.Module) -> set[int]:
    """Biases and the parameters of normalisation layers: trained without weight decay."""
    out = set()
    for module in model.modules():
        norm = "norm" in type(module).__name__.lower()
        for key, param in module.named_parameters(recurse=False):
            if norm or key == "bias" or key.endswith(".bias"):
                out.add(id(param))
    for name, param in model.named_parameters():
        if name.endswith("bias") or "adapter_scale" in name.split("."):
            out.add(id(param))
    return out
