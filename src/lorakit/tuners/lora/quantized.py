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

from ...quant import _balanced_rank_r_factors
from .config import LoraConfig
from .layer import Linear, LoraLayer


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
    from ...nf4 import NF4Linear

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


def replace_lora_weights_loftq(
    peft_model: nn.Module, model_path: str | None = None, adapter_name: str = "default"
) -> int:
    """LoftQ for an already-quantized base: set each quantized layer's LoRA factors so that
    `dequantize(Q) + scaling * B A` is the best rank-r approximation of the original weight W.

    The base Q is fixed (it is what bitsandbytes loaded), so this is one LoftQ step:
    `scaling * B A = svd_r(W - dequantize(Q))`, singular values split evenly between A and B.
    W is read from `model_path`, a `.safetensors` file (as PEFT takes it) or a directory of them
    (default: the model's `config._name_or_path`), under the key `<module name>.weight`. Unlike
    PEFT 0.21.2's function of this name, which needs CUDA, this runs on any device.

    Args:
        peft_model: a `PeftModel`/`LoraModel` whose quantized layers hold adapter `adapter_name`.
        model_path: the full-precision checkpoint the quantized model was loaded from (file or directory).

    Returns:
        The number of layers re-initialised.

    Raises:
        ValueError: no checkpoint directory, a weight missing from it, or no quantized LoRA layer.
    """
    import glob
    import os

    from safetensors import safe_open

    base_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    path = model_path or getattr(getattr(base_model, "config", None), "_name_or_path", None)
    if path and os.path.isfile(path):
        files = [path]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if path and os.path.isdir(path) else []
    if not files:
        raise ValueError(
            f"replace_lora_weights_loftq: no *.safetensors checkpoint found at model_path={path!r}; pass the "
            "directory the quantized model was loaded from."
        )
    layers = [m for m in base_model.modules() if isinstance(m, QuantizedLinear) and adapter_name in m.lora_A]
    if not layers:
        raise ValueError(
            f"replace_lora_weights_loftq: no quantized LoRA layer holds adapter {adapter_name!r}."
        )
    handles = [safe_open(f, framework="pt", device="cpu") for f in files]
    for layer in layers:
        key = f"{layer.module_name}.weight"
        handle = next((h for h in handles if key in h.keys()), None)
        if handle is None:
            raise ValueError(f"replace_lora_weights_loftq: {key!r} is not in the checkpoint at {path!r}.")
        quantized = layer.dequantized_weight().float()
        original = handle.get_tensor(key).to(quantized.device, torch.float32)
        a, b = _balanced_rank_r_factors(
            original - quantized, layer.r[adapter_name], layer.scaling[adapter_name]
        )
        layer.set_factors(adapter_name, a, b)
    return len(layers)
