"""Carry out a `LoraConfig` on a model: resolve the targets, plan each module's rank and alpha,
wrap the modules (or add to existing LoRA layers) and the modules to save, recording undo actions."""

from __future__ import annotations

from torch import nn

from ...targeting import plan_targets, resolve_target_modules
from ..inject import add_module_to_save, modules_to_save_targets, replace_module
from .config import LoraConfig
from .dispatch import create_lora_layer
from .layer import LoraLayer


def inject_lora(
    model: nn.Module,
    adapter_name: str,
    config: LoraConfig,
    kinds: dict[str, str],
    active: list[str],
    undo: list,
) -> None:
    """Add LoRA adapter `adapter_name` to every module `config` selects.

    Args:
        kinds: module name -> kind for every module of `model`.
        active: the model's active adapters (new layers start with them).
        undo: actions that revert what was done, appended as it is done.
    """
    model_config = getattr(model, "config", None)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_head = next((n for n, m in model.named_modules() if output is not None and m is output), None)
    config.target_modules = resolve_target_modules(
        config, kinds, getattr(model_config, "model_type", None), output_head
    )
    plan = plan_targets(kinds, config, config.target_modules)
    save_names = modules_to_save_targets(config, kinds, set(plan))
    for name, target_plan in plan.items():
        _add_lora(model, name, adapter_name, target_plan, config, active, undo)
    for name in save_names:
        add_module_to_save(model, name, adapter_name, active, undo)


def _add_lora(
    model: nn.Module,
    name: str,
    adapter_name: str,
    target_plan,
    config: LoraConfig,
    active: list[str],
    undo: list,
) -> None:
    target = model.get_submodule(name)
    base = target.base_layer if isinstance(target, LoraLayer) else target
    weight = base.weight  # data-driven inits (PiSSA, OLoRA, LoftQ) replace it
    undo.append(lambda: setattr(base, "weight", weight))
    if isinstance(target, LoraLayer):
        undo.append(lambda: target.delete_adapter(adapter_name) if adapter_name in target.r else None)
        target.update_layer(adapter_name, target_plan, config)
        return
    layer = create_lora_layer(target, config, name)
    layer.update_layer(adapter_name, target_plan, config)
    layer.set_adapter(active)
    replace_module(model, name, layer, undo)
