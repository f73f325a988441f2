"""Model preparation helpers that sit beside the adapters."""

from __future__ import annotations

import torch
from torch import nn


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
) -> nn.Module:
    """Ready a (possibly quantized) model for adapter training, as PEFT's function of this name.

    Freezes every parameter. On a quantized model (bitsandbytes 4/8-bit, lorakit's NF4), casts
    every float16/bfloat16 parameter that is not quantized storage (norms, embeddings, the output
    head) to float32, as QLoRA does; on an unquantized model, only half-precision normalisation
    layers are upcast (their statistics are the part of a half-precision model that suffers most).
    With `use_gradient_checkpointing`, makes the input embeddings require grad (so checkpointed
    blocks have a graph to recompute through) and turns gradient checkpointing on (non-reentrant
    unless `gradient_checkpointing_kwargs` says otherwise).

    Returns:
        `model`, changed in place.

    Raises:
        ValueError: `use_gradient_checkpointing` on a model without gradient_checkpointing_enable().
    """
    model.requires_grad_(False)
    if is_quantized_model(model):
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.float()
    else:
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for param in module.parameters(recurse=False):
                    if param.dtype in (torch.float16, torch.bfloat16):
                        param.data = param.data.float()
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        kwargs = (
            {"use_reentrant": False}
            if gradient_checkpointing_kwargs is None
            else gradient_checkpointing_kwargs
        )
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); pass "
                "use_gradient_checkpointing=False or enable checkpointing in your own forward."
            )
    return model


def is_quantized_model(model: nn.Module) -> bool:
    """True when `model` was loaded quantized (bitsandbytes via transformers) or holds
    `lorakit.nf4.NF4Linear` layers (`quantize_model_nf4`)."""
    return bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_quantized", False)
        or getattr(getattr(model, "config", None), "quantization_config", None)
    )
