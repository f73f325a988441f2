"""Carry out a `BottleneckConfig` on a model: which sublayers get wrapped, with what sizes.

Called by `LoraModel.inject_adapter` (like `tuners/lora/inject.py`), which owns the undo list (a failure anywhere leaves the
model as it was) and the adapter bookkeeping; LoRA and bottleneck adapters share that lifecycle.
"""

from __future__ import annotations

from torch import nn

from ...targeting import name_matches, select_targets
from ..inject import add_module_to_save, modules_to_save_targets, replace_module
from ..lora.layer import adapter_dtype, is_gpt2_conv1d
from .config import BottleneckConfig, default_targets
from .layer import BottleneckLayer

# module kinds (see `model.module_kind`) a bottleneck adapter cannot wrap, and why
_REFUSED = {
    "embedding": "an embedding's input is token ids, not hidden states",
    "conv": "a convolution's features are not on the last dimension",
    "adapted": "it holds LoRA adapters; a module takes adapters of one family",
}
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def inject_bottleneck(
    model: nn.Module,
    adapter_name: str,
    config: BottleneckConfig,
    kinds: dict[str, str],
    active: list[str],
    undo: list,
) -> None:
    """Wrap every selected sublayer in a `BottleneckLayer` (or add to an existing one).

    Args:
        kinds: module name -> kind for every module of `model`.
        active: the model's active adapters (new layers start with them).
        undo: actions that revert what was done, appended as it is done.

    Raises:
        ValueError: nothing matches, a match cannot take a bottleneck adapter, one match contains
            another, or its sizes cannot be found.
    """
    model_config = getattr(model, "config", None)
    if config.target_modules is None:
        config.target_modules, config.exclude_modules = _defaults(model_config, config)
    _check_not_inside_adapters(kinds, config.target_modules)
    names = select_targets(kinds, config, config.target_modules)
    modules = dict(model.named_modules())
    _check_targets(names, kinds, modules)
    save_names = modules_to_save_targets(config, kinds, set(names))
    hidden_size = getattr(model_config, "hidden_size", None)
    for name in names:
        _add_bottleneck(model, name, adapter_name, config, hidden_size, active, undo)
    for name in save_names:
        add_module_to_save(model, name, adapter_name, active, undo)


def _defaults(model_config, config: BottleneckConfig) -> tuple[set[str], set[str] | None]:
    model_type = getattr(model_config, "model_type", None)
    try:
        return default_targets(model_type, config.mode)
    except ValueError:
        raise ValueError(
            f"target_modules=None, and lorakit has no default bottleneck placement for model_type={model_type!r}; "
            "pass target_modules, e.g. the attention and feed-forward output projections "
            "(target_modules=['o_proj', 'down_proj'])."
        ) from None


def _check_not_inside_adapters(kinds: dict[str, str], targets: set[str] | str) -> None:
    """A target hidden inside another adapter layer (`...mlp.base_layer.down_proj`) is refused by
    name here; the matching rules skip such names, which would only say "matched no module"."""
    for name in kinds:
        parts = name.split(".")
        inside = "base_layer" in parts[:-1]  # `x.base_layer` itself is the wrapped module x
        if inside and name_matches(name.replace(".base_layer", ""), targets):
            owner = ".".join(parts[: parts.index("base_layer")])
            raise ValueError(
                f"target_modules={sorted(targets) if isinstance(targets, set) else targets!r} selects "
                f"{name.replace('.base_layer', '')!r}, which is inside {owner!r}, already wrapped by an adapter; "
                "adapters of nested modules cannot share a model. Target the same modules as that adapter."
            )


def _check_targets(names: list[str], kinds: dict[str, str], modules: dict[str, nn.Module]) -> None:
    for name in names:
        kind = kinds[name].split(":")[0]
        if kind in _REFUSED:
            raise ValueError(
                f"target_modules matched {name!r} ({type(modules[name]).__name__}), which cannot take a bottleneck "
                f"adapter: {_REFUSED[kind]}. Narrow target_modules or list it in exclude_modules."
            )
        if isinstance(modules[name], _CONTAINERS) or kinds[name] == "other:ModulesToSaveWrapper":
            raise ValueError(
                f"target_modules matched {name!r} ({type(modules[name]).__name__}), which is not a sublayer with "
                "an input and an output; target the modules inside it."
            )
        inner = [n for n in kinds if n.startswith(name + ".")]
        nested = [n for n in inner if n in names]
        if nested:
            raise ValueError(
                f"target_modules matched both {name!r} and its submodule {nested[0]!r}; a bottleneck adapter "
                "wraps one of them. Narrow target_modules."
            )
        adapted_inside = [n for n in inner if kinds[n].startswith("adapted") or kinds[n] == "bottleneck"]
        if adapted_inside:
            family = "LoRA" if kinds[adapted_inside[0]].startswith("adapted") else "bottleneck"
            raise ValueError(
                f"{name!r} contains {family}-adapted {adapted_inside[0]!r}; wrapping it would rename that adapter's "
                "parameters. Put this adapter on a module with no adapter layer inside (adapters of nested "
                "modules cannot share a model)."
            )


def _add_bottleneck(
    model: nn.Module,
    name: str,
    adapter_name: str,
    config: BottleneckConfig,
    hidden_size: int | None,
    active: list[str],
    undo: list,
) -> None:
    target = model.get_submodule(name)
    if isinstance(target, BottleneckLayer):
        layer = target
        undo.append(
            lambda: layer.delete_adapter(adapter_name) if adapter_name in layer.adapter_down else None
        )
    else:
        in_features, out_features = _sizes(name, target, hidden_size)
        layer = BottleneckLayer(target, in_features, out_features)
        layer.module_name = name
        replace_module(model, name, layer, undo)
    reference = next(layer.base_layer.parameters(), None)
    factory = {} if reference is None else {"device": reference.device, "dtype": adapter_dtype(reference)}
    layer.update_layer(adapter_name, config, factory)
    layer.set_adapter(active)


def _sizes(name: str, module: nn.Module, hidden_size: int | None) -> tuple[int, int]:
    """(d_in, d_out): a Linear's or Conv1D's own; the model's hidden size for other sublayers."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_gpt2_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(hidden_size, int):
        return hidden_size, hidden_size
    raise ValueError(
        f"Cannot tell the input and output sizes of {name!r} ({type(module).__name__}): it is no Linear or "
        "Conv1D and the model's config has no hidden_size. Target the Linear layers inside it."
    )
