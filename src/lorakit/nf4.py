"""QLoRA without bitsandbytes: linear layers stored in lorakit's blockwise NF4 (`quant.quantize`).

`quantize_model_nf4(model)` replaces `nn.Linear` layers by `NF4Linear`, which keeps the weight as
4-bit codes (one per byte, not bit-packed) plus one float32 absmax per block, and computes
`x dequantize(W)^T + b` in the input's dtype. `get_peft_model` then puts LoRA on them
(`layers.quantized.NF4LoraLinear`); the codes are buffers, so nothing of the base can train.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .quant import QuantizedTensor, dequantize, quantize


class NF4Linear(nn.Linear):
    """A frozen linear layer whose weight is NF4-quantized: `y = x dequantize(W)^T + b`.

    It subclasses nn.Linear (as bitsandbytes' layers do) so that targeting treats it as a linear
    layer ("all-linear" finds it); `weight` is the uint8 codes, as with bitsandbytes' Params4bit.

    Shapes: x (..., in_features) -> (..., out_features). Buffers: `codes` uint8
    (ceil(out*in / block_size), block_size), `absmax` float32 (num_blocks,). `bias` (out_features,)
    is a frozen parameter in the original dtype, or None.
    """

    def __init__(self, linear: nn.Linear, block_size: int = 64) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size = block_size
        self.weight_dtype = linear.weight.dtype
        self.set_weight(linear.weight.detach())
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` (out_features, in_features) into this layer's codes and scales."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"NF4Linear.set_weight: weight has shape {tuple(weight.shape)}, expected "
                f"{(self.out_features, self.in_features)}."
            )
        q = quantize(weight.detach(), bits=4, method="nf", block_size=self.block_size)
        self.register_buffer("codes", q.codes)
        self.register_buffer("absmax", q.absmax)

    @property
    def weight(self) -> torch.Tensor:
        """The stored codes (uint8); `dequantized_weight()` is the float weight."""
        return self.codes

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as a (out_features, in_features) tensor of the original dtype."""
        shape = torch.Size((self.out_features, self.in_features))
        return dequantize(QuantizedTensor(self.codes, self.absmax, shape, self.weight_dtype, "nf", 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}"
        )


def quantize_model_nf4(
    model: nn.Module, skip_modules: tuple[str, ...] = ("lm_head",), block_size: int = 64
) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by an `NF4Linear`, except modules whose
    name or last name component is in `skip_modules` (the output head by default).

    Args:
        model: any module; its Linear weights are quantized blockwise to NF4 (QLoRA's 4-bit code).
        skip_modules: names kept in full precision.
        block_size: values per absmax scale (QLoRA uses 64).

    Returns:
        `model`, with `is_quantized = True` and `quantization_method = "lorakit_nf4"` set.

    Raises:
        ValueError: no nn.Linear left to quantize.
    """
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and name not in skip_modules
        and name.rsplit(".", 1)[-1] not in skip_modules
    ]
    if not names:
        raise ValueError(
            f"quantize_model_nf4: {type(model).__name__} has no nn.Linear outside skip_modules={skip_modules}."
        )
    replacements = {name: NF4Linear(model.get_submodule(name), block_size) for name in names}
    for name, layer in replacements.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    model.is_quantized = True
    model.quantization_method = "lorakit_nf4"
    return model
