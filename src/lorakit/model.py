"""`LoraModel`: carries out a targeting plan on a model and runs the adapter lifecycle.

Injection is all-or-nothing: if any module cannot take the adapter, every module touched is put
back and the error is raised, so a failed call leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator

from torch import nn
from tqdm.auto import tqdm

from .config import PeftConfig, bias_mode
from .replication import replicate_layers
from .tuners.base import (
    BASE_ADAPTER_NAME,
    AdapterLayer,
    ModulesToSaveWrapper,
    bind_sample_adapters,
    running_sample_adapters,
)
from .tuners.bottleneck.config import BottleneckConfig
from .tuners.bottleneck.inject import inject_bottleneck
from .tuners.bottleneck.layer import BottleneckLayer
from .tuners.inject import parent_of
from .tuners.lora.config import LoraConfig, is_data_driven_init
from .tuners.lora.inject import inject_lora
from .tuners.lora.layer import LoraLayer, is_gpt2_conv1d
from .tuners.lora.weighted import add_weighted_adapter


def module_kind(module: nn.Module) -> str:
    """The coarse kind the targeting plan works with (see `targeting.plan_targets`)."""
    if isinstance(module, LoraLayer):
        return "adapted:" + module_kind(module.base_layer)
    if isinstance(module, BottleneckLayer):
        return "bottleneck"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if is_gpt2_conv1d(module):
        return "conv1d_gpt2"
    return "other:" + type(module).__name__


class LoraModel(nn.Module):
    """A model with adapters injected (PEFT's `LoraModel`): LoRA and bottleneck adapters, by name.

    Args:
        model: any `nn.Module`; its target modules are replaced in place by adapter layers that
            keep the original as `base_layer`.
        config: a `LoraConfig` or `BottleneckConfig`, or a dict {adapter_name: config} as PEFT accepts.
        adapter_name: name of the first adapter.
    """

    prefix = "lora_"

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig | dict,
        adapter_name: str = "default",
        then: Callable[[LoraModel, str], None] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self._active_adapter: list[str] = [adapter_name]
        self._layer_map: list[list[int]] | None = None  # the layer_replication applied, if any
        if isinstance(config, dict):
            config = config[adapter_name]
        self.inject_adapter(adapter_name, config, then=then)

    # ---- pass-through ----------------------------------------------------------------------
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's forward; `adapter_names` (one per sample) runs a mixed batch."""
        with self.per_sample_adapters(adapter_names):
            return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def per_sample_adapters(self, adapter_names: list[str] | None) -> Iterator[None]:
        """Within the block every adapted layer gives sample i adapter `adapter_names[i]` alone
        (`"__base__"`: the base model), in training as in inference; None changes nothing.
        The names hold for this thread's call only (other threads may run other names at once),
        and for the recomputation of layers checkpointed by transformers' gradient checkpointing.

        The active set is ignored for such a batch; an adapter trains on its samples if its
        parameters require grad (`set_adapter` on all the names makes them trainable).

        Raises:
            ValueError: an unknown name, adapters merged into the base weights, or adapter layers
                that cannot run a mixed batch.
        """
        if adapter_names is None:
            yield
            return
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = sorted({n for n in names if n != BASE_ADAPTER_NAME and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"adapter_names has unknown adapter(s) {unknown}; this model has {list(self.peft_config)} "
                f"(use {BASE_ADAPTER_NAME!r} for the base model)."
            )
        layers = list(self._adapter_modules())
        unsupported = [m for m in layers if not m.supports_mixed_batches]
        if unsupported:
            raise ValueError(
                f"adapter_names= (a mixed batch) is not supported by {type(unsupported[0]).__name__} layers "
                f"(e.g. {getattr(unsupported[0], 'module_name', '') or 'one of this model'}); run one adapter "
                "per batch with set_adapter() instead."
            )
        merged = [m.module_name for m in layers if isinstance(m, AdapterLayer) and m.merged]
        if merged:
            raise ValueError(
                f"Adapters are merged into {merged[0]!r} (and {len(merged) - 1} more modules); a mixed batch "
                "(adapter_names=) needs unmerged adapters: call unmerge_adapter() first."
            )
        for module in self.model.modules():  # transformers' activation checkpointing
            checkpoint = module.__dict__.get("_gradient_checkpointing_func")
            if checkpoint is not None:
                module._gradient_checkpointing_func = bind_sample_adapters(checkpoint)
        with running_sample_adapters({id(layer): names for layer in layers}):
            yield

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- the active set --------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate `adapter_name` (one name, or several to sum their outputs)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; this model has {list(self.peft_config)}.")
        for layer in self._adapter_modules():
            layer.set_adapter(names)
        self._active_adapter = names

    def enable_adapter_layers(self) -> None:
        """Use the adapters again after `disable_adapter_layers`."""
        for layer in self._adapter_modules():
            layer.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone (merged adapters are unmerged on the next forward)."""
        for layer in self._adapter_modules():
            layer.enable_adapters(False)

    # ---- adding and removing ---------------------------------------------------------------
    def inject_adapter(
        self,
        adapter_name: str,
        config: LoraConfig | BottleneckConfig,
        then: Callable[[LoraModel, str], None] | None = None,
    ) -> None:
        """Add adapter `adapter_name` to every module the config selects.

        Args:
            then: called with this model and `adapter_name` once the adapter is in place (a load copies the saved
                weights in); if it raises, the adapter is taken out again as if never added.
        Raises:
            ValueError / NotImplementedError: bad or unsupported config, or whatever `then` raised;
                the model is unchanged (module tree, base weights, block layout, adapters).
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name.")
        if not isinstance(config, (LoraConfig, BottleneckConfig)):
            raise TypeError(f"LoraModel takes a LoraConfig or BottleneckConfig, got {type(config).__name__}.")
        if isinstance(config, LoraConfig):
            config.check_supported()
        if self.peft_config and any(bias_mode(c) != "none" for c in [config, *self.peft_config.values()]):
            raise ValueError(
                "Several adapters on one model need bias='none' on all of them: a trained base bias "
                "cannot belong to one adapter. Use lora_bias=True for a per-adapter bias instead."
            )
        config = copy.deepcopy(config)
        undo: list = []
        if getattr(config, "layer_replication", None) is not None:
            self._replicate(config.layer_replication, undo)
        try:
            self._inject(adapter_name, config, undo)
            self.peft_config[adapter_name] = config
            undo.append(lambda: self.peft_config.pop(adapter_name, None))
            if then is not None:
                then(self, adapter_name)
        except Exception:
            for action in reversed(undo):
                action()
            raise
        init = getattr(config, "init_lora_weights", None)
        if is_data_driven_init(init):
            warnings.warn(
                f"init_lora_weights={init!r} replaced the targeted base weights (residual or quantized): "
                "disable_adapter() and other adapters now see that base, not the original model. To share the "
                "result, save with path_initial_model_for_weight_conversion (PiSSA/OLoRA) to get a plain LoRA.",
                stacklevel=3,
            )
        for layer in self._adapter_modules():
            if adapter_name in layer.adapter_names and config.inference_mode:
                layer.frozen_adapters.add(adapter_name)
        self._mark_trainable()

    def _replicate(self, layer_map: list[list[int]], undo: list) -> None:
        layer_map = [list(pair) for pair in layer_map]
        if self._layer_map is None:
            undo.append(replicate_layers(self.model, layer_map))
            undo.append(lambda: setattr(self, "_layer_map", None))
            self._layer_map = layer_map
        elif layer_map != self._layer_map:
            raise ValueError(
                f"layer_replication={layer_map} differs from the {self._layer_map} this model was built with; "
                "all adapters on one model share one block layout."
            )

    def _inject(self, adapter_name: str, config: LoraConfig | BottleneckConfig, undo: list) -> None:
        kinds = {name: module_kind(module) for name, module in self.model.named_modules()}
        family = inject_bottleneck if isinstance(config, BottleneckConfig) else inject_lora
        family(self.model, adapter_name, config, kinds, self._active_adapter, undo)

    def delete_adapter(self, adapter_name: str, unwrap_empty: bool = False) -> None:
        """Remove adapter `adapter_name` everywhere.

        Layers left with no adapter stay wrapped, as in PEFT, so parameter names do not move;
        `unwrap_empty=True` gives them their base module back (used to undo a failed load).
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; this model has {list(self.peft_config)}.")
        for layer in self._adapter_modules():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if unwrap_empty:
            self._unwrap_empty()
        if adapter_name in self._active_adapter:
            remaining = [n for n in self._active_adapter if n != adapter_name]
            self._active_adapter = remaining or list(self.peft_config)[:1]
            if self._active_adapter:
                self.set_adapter(self._active_adapter)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs
    ) -> None:
        """Combine existing adapters into a new one (`lorakit.tuners.lora.weighted` plans it, this
        injects it; a failure leaves the model as it was)."""
        add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs)

    # ---- merging and unloading -------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights, keeping the LoRA layers (undo: `unmerge_adapter`)."""
        layers = [m for m in self.model.modules() if isinstance(m, AdapterLayer)]
        self._check_mergeable(layers, adapter_names, safe_merge)
        _untie_merge_targets(layers, adapter_names)
        for layer in layers:
            layer.merge(adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights."""
        for layer in self.model.modules():
            if isinstance(layer, AdapterLayer):
                layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge adapters (default: the active ones) into the base weights and return the plain model.

        Every adapter is checked for NaN/Inf before any weight changes (with `safe_merge`, the
        merged weights too), so a failure leaves the model intact.
        """
        unknown = [n for n in adapter_names or [] if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; this model has {list(self.peft_config)}.")
        layers = [m for m in self.model.modules() if isinstance(m, AdapterLayer)]
        self._check_mergeable(layers, adapter_names, safe_merge)
        _untie_merge_targets(layers, adapter_names)
        return self._unload(merge=True, progressbar=progressbar, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model as it was."""
        return self._unload(merge=False, progressbar=False, adapter_names=None)

    def _check_mergeable(
        self, layers: list[AdapterLayer], adapter_names: list[str] | None, safe_merge: bool
    ) -> None:
        for layer in layers:
            names = layer._mergeable(adapter_names)
            layer._check_merge_allowed(names)
            for name in names:
                layer.check_finite(name, with_base=safe_merge)

    def _unload(self, merge: bool, progressbar: bool, adapter_names: list[str] | None) -> nn.Module:
        targets = [
            (n, m)
            for n, m in self.model.named_modules()
            if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))
        ]
        for name, module in tqdm(
            targets, disable=not progressbar, desc="Unloading" + (" and merging" * merge)
        ):
            parent, attr = self._parent(name)
            if isinstance(module, AdapterLayer):
                if merge:
                    module.merge(adapter_names=adapter_names)
                else:
                    module.unmerge()
                setattr(parent, attr, module.base_layer)
            else:
                keep = module.current_module() if merge else module.original_module
                setattr(parent, attr, keep)
        return self.model

    # ---- helpers ---------------------------------------------------------------------------
    def _adapter_modules(self) -> Iterator[AdapterLayer | ModulesToSaveWrapper]:
        for module in self.model.modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield module

    def _mark_trainable(self) -> None:
        """Freeze everything but the active adapters, their modules_to_save copies and the biases
        their `bias` mode trains."""
        self.model.requires_grad_(False)
        active = [self.peft_config[n] for n in self._active_adapter if n in self.peft_config]
        trainable = [c for c in active if not c.inference_mode]
        for config in trainable:
            if bias_mode(config) == "all":
                for name, param in self.model.named_parameters():
                    if name.split(".")[-1] == "bias" and "original_module" not in name.split("."):
                        param.requires_grad_(True)
            elif bias_mode(config) == "lora_only":
                for layer in self.model.modules():
                    if isinstance(layer, LoraLayer) and getattr(layer.base_layer, "bias", None) is not None:
                        layer.base_layer.bias.requires_grad_(True)
        for layer in self._adapter_modules():
            layer.set_adapter(self._active_adapter)

    def _unwrap_empty(self) -> None:
        for name, module in list(self.model.named_modules()):
            if isinstance(module, AdapterLayer) and not module.adapter_names:
                parent, attr = self._parent(name)
                setattr(parent, attr, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper) and not module.modules_to_save:
                parent, attr = self._parent(name)
                setattr(parent, attr, module.original_module)

    def _parent(self, name: str) -> tuple[nn.Module, str]:
        return parent_of(self.model, name)


def _untie_merge_targets(layers: list[AdapterLayer], adapter_names: list[str] | None) -> None:
    """Give each layer about to merge its own copy of a base weight it shares with another layer.

    Replicated blocks share base tensors; merging one block's adapter into a shared tensor would
    change every copy (PEFT's merge of replicated layers is wrong for this reason).
    """
    owners: dict[int, int] = {}
    for layer in layers:
        for tensor in (getattr(layer.base_layer, "weight", None), getattr(layer.base_layer, "bias", None)):
            if tensor is not None:
                owners[tensor.data_ptr()] = owners.get(tensor.data_ptr(), 0) + 1
    for layer in layers:
        if not layer._mergeable(adapter_names):
            continue
        base = layer.base_layer
        for key in ("weight", "bias"):
            tensor = getattr(base, key, None)
            if tensor is not None and owners[tensor.data_ptr()] > 1:
                owners[tensor.data_ptr()] -= 1
                setattr(base, key, nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad))
