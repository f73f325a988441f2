"""Model preparation helpers that sit beside the adapters."""

from __future__ import annotations

import torch
from torch import nn


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
) -> nn.Module:
    """Ready a model for adapter training (PEFT's name; lorakit handles unquantized models).

    Freezes every parameter, upcasts half-precision normalisation layers to float32 (their
    statistics are the part of a half-precision model that suffers most), and, with
    `use_gradient_checkpointing`, makes the input embeddings require grad (so checkpointed blocks
    have a graph to recompute through) and turns gradient checkpointing on (non-reentrant unless
    `gradient_checkpointing_kwargs` says otherwise).

    Raises:
        NotImplementedError: the model is quantized (bitsandbytes / GPTQ bases are not supported yet).
    """
    if (
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(getattr(model, "config", None), "quantization_config", None)
    ):
        raise NotImplementedError(
            "prepare_model_for_kbit_training: quantized base models are not supported by lorakit yet; "
            "load the model unquantized (e.g. torch_dtype=torch.bfloat16)."
        )
    model.requires_grad_(False)
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
