"""Which LoRA layer wraps a module: the dispatchers, quantized layers first (they subclass
nn.Linear). Kept apart from `lora.py` and `quantized.py`, which it imports both of."""

from __future__ import annotations

import functools
import warnings

from torch import nn

from .config import LoraConfig
from .layer import Conv, Embedding, Linear, LoraLayer, is_gpt2_conv1d
from .quantized import dispatch_quantized


def create_lora_layer(target: nn.Module, config: LoraConfig, name: str) -> LoraLayer:
    """Wrap `target` in the LoRA layer for its type (no adapter added yet): the first dispatcher
    that recognises it wins (quantized linear layers first: they subclass nn.Linear).

    Raises:
        ValueError: `target` is not a layer type LoRA supports.
    """
    for dispatch in (dispatch_quantized, functools.partial(_dispatch_plain, config=config, name=name)):
        layer = dispatch(target)
        if layer is not None:
            layer.module_name = name
            return layer
    raise ValueError(f"{name!r} is a {type(target).__name__}, which LoRA cannot adapt.")


def _dispatch_plain(target: nn.Module, config: LoraConfig, name: str) -> LoraLayer | None:
    """LoRA layers for torch's own layer types and transformers' Conv1D; None for anything else."""
    if isinstance(target, nn.Embedding):
        layer: LoraLayer = Embedding(target)
    elif isinstance(target, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        layer = Conv(target)
    elif isinstance(target, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out=True, but {name!r} is an nn.Linear (weight stored (out, in)); using False.",
                stacklevel=5,
            )
            config.fan_in_fan_out = False
        layer = Linear(target, fan_in_fan_out=False)
    elif is_gpt2_conv1d(target):
        if not config.fan_in_fan_out:
            warnings.warn(
                f"{name!r} is a transformers Conv1D (weight stored (in, out)); setting fan_in_fan_out=True.",
                stacklevel=5,
            )
            config.fan_in_fan_out = True
        layer = Linear(target, fan_in_fan_out=True)
    else:
        return None
    return layer
