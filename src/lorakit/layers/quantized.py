"""LoRA on quantized linear bases: bitsandbytes `Linear4bit` / `Linear8bitLt` and lorakit's `NF4Linear`.

A quantized layer only changes two things about `layers.lora.Linear`: how the base weight is read
as a float matrix (dequantization, for DoRA's norm and for merging) and how a merged weight is
written back (requantization into the same quant type). The forward is the generic
`base_layer(x) + adapters`: the fused kernel path never applies (`_plain_base()` is False for these
base types), since it would need the float weight.

bitsandbytes stays optional: it is only looked at when it has already been imported (a bnb
module cannot exist otherwise).
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from ..config import LoraConfig
from .lora import Linear, LoraLayer


class QuantizedLinear(Linear):
    """LoRA on a linear layer whose weight is stored quantized.

    Shapes: x (..., in_features) -> (..., out_features); A (r, in_features); B (out_features, r).
    Merging computes `requantize(dequantize(W) + delta)`, so the merged layer differs from the
    unmerged one by the new rounding (a `UserWarning` says so); unmerging rounds again.

    Subclasses implement `dequantized_weight()` and `requantize(weight)`.
    """

    quant_name = "quantized"

    def __init__(self, base_layer: nn.Module) -> None:
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight as a float (out_features, in_features) tensor."""
        raise NotImplementedError

    def requantize(self, weight: torch.Tensor) -> None:
        """Replace the base weight by `weight` (out_features, in_features), quantized as before."""
        raise NotImplementedError

    def _create(self, adapter_name: str, r: int, config: LoraConfig, factory: dict) -> None:
        if config.lora_bias:
            raise ValueError(
                f"lora_bias=True is not supported on the {self.quant_name} base {self.module_name!r}; "
                "set lora_bias=False."
            )
        super()._create(adapter_name, r, config, factory)

    def _initialise_from_weight(self, adapter_name: str, config: LoraConfig) -> None:
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} needs the full-precision weight, but "
            f"{self.module_name!r} is {self.quant_name}. For LoftQ on a quantized base, add the adapter "
            "with the default init and call lorakit.replace_lora_weights_loftq(model); for PiSSA/OLoRA, "
            "initialise on the unquantized model."
        )

    def _base_rows(self) -> torch.Tensor:
        return self.dequantized_weight()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """As `LoraLayer.get_delta_weight`, in float (out_features, in_features) (not the storage dtype)."""
        delta = self._delta_rows(adapter_name)
        if self.use_dora.get(adapter_name):
            rows = self._base_rows()
            factor = self._dora_factor(adapter_name).detach().to(rows.dtype)
            delta = factor[:, None] * (rows + delta.to(rows.dtype)) - rows
        return delta

    def check_finite(self, adapter_name: str, with_base: bool) -> None:
        super().check_finite(adapter_name, with_base=False)
        if with_base and not torch.isfinite(self._base_rows() + self.get_delta_weight(adapter_name)).all():
            raise ValueError(
                f"Merging adapter {adapter_name!r} into {self.module_name!r} would put NaN/Inf into the base "
                "weight; refusing to merge (the base weights are unchanged)."
            )

    def _merge_weight(self, adapter_name: str) -> None:
        warnings.warn(
            f"Merging a LoRA adapter into a {self.quant_name} base requantizes the merged weight; the "
            "rounding changes outputs slightly (merged != unmerged exactly).",
            UserWarning,
            stacklevel=2,
        )
        if self.use_dora.get(adapter_name):
            self._dora_merge_factor[adapter_name] = self._dora_factor(adapter_name).detach()
        rows = self._base_rows()
        self.requantize(rows + self.get_delta_weight(adapter_name).to(rows.dtype))

    def _unmerge_weight(self, adapter_name: str) -> None:
        rows = self._base_rows()
        delta = self._delta_rows(adapter_name).to(rows.dtype)
        if self.use_dora.get(adapter_name):
            factor = self._dora_merge_factor.pop(adapter_name).to(rows.dtype)
            self.requantize(rows / factor[:, None] - delta)
        else:
            self.requantize(rows - delta)


class Linear4bit(QuantizedLinear):
    """LoRA on `bitsandbytes.nn.Linear4bit` (nf4 or fp4, any compute dtype)."""

    quant_name = "bitsandbytes 4-bit"

    def dequantized_weight(self) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = self.base_layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # an inference forward on an AVX512-BF16 CPU repacks the codes; undo it as bnb's own
            # state_dict does (the next inference forward repacks)
            weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)

    def requantize(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = self.base_layer.weight
        state = old.quant_state
        new = bnb.nn.Params4bit(
            weight.to(state.dtype).cpu(),
            requires_grad=False,
            quant_type=state.quant_type,
            blocksize=state.blocksize,
            compress_statistics=old.compress_statistics,
            quant_storage=old.quant_storage,
            module=self.base_layer,
        )
        self.base_layer.weight = new.to(old.device)


class Linear8bitLt(QuantizedLinear):
    """LoRA on `bitsandbytes.nn.Linear8bitLt` (LLM.int8(), frozen int8 weights)."""

    quant_name = "bitsandbytes 8-bit"

    def _row_scales(self) -> torch.Tensor:
        base = self.base_layer
        # before the first forward the scales live on the weight; the forward moves them to `state`
        scales = base.state.SCB if base.state.SCB is not None else base.weight.SCB
        if scales is None:
            raise ValueError(
                f"{self.module_name!r}: Linear8bitLt has no int8 row scales (SCB); move the model to its "
                "device (which quantizes the weight) before merging."
            )
        return scales

    def dequantized_weight(self) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.functional.int8_vectorwise_dequant(self.base_layer.weight.data, self._row_scales())

    def requantize(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = self.base_layer
        device = base.weight.device
        new = bnb.nn.Int8Params(weight.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
        base.weight = new.to(device)
        base.state.CB = None
        base.state.SCB = None


class NF4LoraLinear(QuantizedLinear):
    """LoRA on lorakit's `nf4.NF4Linear` (QLoRA without bitsandbytes)."""

    quant_name = "lorakit NF4"

    def dequantized_weight(self) -> torch.Tensor:
        return self.base_layer.dequantized_weight()

    def requantize(self, weight: torch.Tensor) -> None:
        self.base_layer.set_weight(weight)


def dispatch_quantized(target: nn.Module) -> LoraLayer | None:
    """The quantized LoRA layer for `target`, or None when `target` is not a quantized linear layer."""
    from ..nf4 import NF4Linear

    if isinstance(target, NF4Linear):
        return NF4LoraLinear(target)
    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes as bnb

    if isinstance(target, bnb.nn.Linear4bit):
        return Linear4bit(target)
    if isinstance(target, bnb.nn.Linear8bitLt):
        return Linear8bitLt(target)
    return None
