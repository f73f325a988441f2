"""PEFT's on-disk format: key names, safetensors, atomic writes, validation on load.

File keys are the in-memory names under `base_model.model.` with the adapter name removed:
`<path>.lora_A.weight`, `<path>.lora_embedding_A`, modules_to_save copies at their own path
(`classifier.weight`). Bottleneck adapters: `<path>.adapter_down.weight` / `.bias`,
`<path>.adapter_up.weight` / `.bias`, and when used `<path>.adapter_layer_norm.weight` / `.bias`
and `<path>.adapter_scale`. The mapping is built from the model's structure, never by string
replacement, so an adapter name that also occurs in a module path cannot corrupt it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

from .files import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    _fsync,
    _fsync_dir,
    _temp_path,
    finish_interrupted_save,
    pending_name,
)
from .tuners.base import ModulesToSaveWrapper
from .tuners.bottleneck.layer import BottleneckLayer
from .tuners.lora.layer import Embedding, LoraLayer

PREFIX = "base_model.model."
# The attribute FSDP1 (FullyShardedDataParallel) wraps a module under; it is no part of a file key.
FSDP1_WRAPPED = "_fsdp_wrapped_module"
# Embedding layers whose full base weight PEFT saves with the adapter when they are targeted
# (`save_embedding_layers="auto"`): their rows may have been resized or retrained.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class Slot:
    """One file key's place in memory: the tensor, and whether a file must contain it."""

    tensor: torch.Tensor
    required: bool


def adapter_slots(
    model: nn.Module, adapter_name: str, bias: str, save_embedding_layers: bool
) -> dict[str, Slot]:
    """File key -> in-memory tensor for adapter `adapter_name` of the adapted `model`.

    Args:
        model: the inner model (`LoraModel.model`) holding the adapter layers.
        bias: the adapter's bias mode; "all" / "lora_only" add the trained biases (optional on load,
            since PEFT files do not always carry them).
        save_embedding_layers: also map the base weight of targeted embedding layers.
    """
    slots: dict[str, Slot] = {}
    adapted_bias_owners: set[str] = set()
    for wrapped_path, module in model.named_modules():
        path = _unwrapped(wrapped_path)
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            for key, tensor in _lora_tensors(module, adapter_name):
                slots[f"{PREFIX}{path}.{key}"] = Slot(tensor, required=True)
            base_bias = getattr(module.base_layer, "bias", None)
            if bias in ("all", "lora_only") and isinstance(base_bias, torch.Tensor):
                slots[f"{PREFIX}{path}.base_layer.bias"] = Slot(base_bias, required=False)
                adapted_bias_owners.add(f"{path}.base_layer")
            if (
                save_embedding_layers
                and isinstance(module, Embedding)
                and path.endswith(EMBEDDING_LAYER_NAMES)
            ):
                slots[f"{PREFIX}{path}.base_layer.weight"] = Slot(module.base_layer.weight, required=False)
        elif isinstance(module, BottleneckLayer) and adapter_name in module.adapter_down:
            for key, tensor in _bottleneck_tensors(module, adapter_name):
                slots[f"{PREFIX}{path}.{key}"] = Slot(tensor, required=True)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                slots[f"{PREFIX}{path}.{key}"] = Slot(tensor, required=True)
    if bias == "all":
        for name, tensor in _all_biases(model, adapter_name):
            slots.setdefault(f"{PREFIX}{name}", Slot(tensor, required=False))
    return slots


def _unwrapped(path: str) -> str:
    """`path` without FSDP1's wrapper attribute: `layers.0._fsdp_wrapped_module.mlp` -> `layers.0.mlp`."""
    return ".".join(part for part in path.split(".") if part != FSDP1_WRAPPED)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every FSDP2 shard (DTensor) gathered into its full tensor on the CPU.

    Gathering is a collective: every rank must call this with the same keys, in the same order.
    """
    from torch.distributed.tensor import DTensor

    return {
        key: tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor
        for key, tensor in tensors.items()
    }


def _lora_tensors(layer: LoraLayer, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    if adapter_name in layer.lora_A:
        yield "lora_A.weight", layer.lora_A[adapter_name].weight
        lora_b = layer.lora_B[adapter_name]
        yield "lora_B.weight", lora_b.weight
        if lora_b.bias is not None:
            yield "lora_B.bias", lora_b.bias
    if adapter_name in layer.lora_embedding_A:
        yield "lora_embedding_A", layer.lora_embedding_A[adapter_name]
        yield "lora_embedding_B", layer.lora_embedding_B[adapter_name]
    if adapter_name in layer.lora_magnitude_vector:
        yield "lora_magnitude_vector", layer.lora_magnitude_vector[adapter_name].weight


def _bottleneck_tensors(layer: BottleneckLayer, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    for container in layer.adapter_layer_names:
        holder = getattr(layer, container)
        if adapter_name not in holder:
            continue
        item = holder[adapter_name]
        if isinstance(item, torch.Tensor):
            yield container, item
        else:
            for key, tensor in item.state_dict(keep_vars=True).items():
                yield f"{container}.{key}", tensor


def _all_biases(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every bias outside the adapters, named as PEFT names them in a bias="all" file."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        parts = name.split(".")
        if parts[-1] != "bias" or any(p.startswith("lora_") for p in parts):
            continue
        if "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            if parts[i + 1] != adapter_name:
                continue
            name = ".".join(parts[: i + 1] + parts[i + 2 :])
        yield name, tensor


def save_adapter_files(
    directory: str, tensors: dict[str, torch.Tensor], config_text: str, safe: bool
) -> None:
    """Write the weights file and `adapter_config.json` so that a kill at any moment leaves a folder
    that loads as the old adapter or as the new one, never as a mix.

    Two renames cannot be one atomic step, so the save has a commit point that a loader can see:
    1. both files are written and fsynced under temporary names;
    2. the weights are renamed to `.adapter_model.<ext>.pending` (not committed: loaders read the
       old pair and ignore it);
    3. the config is renamed to `.adapter_config.json.pending`: the commit. From here on loaders
       read this config and the pending weights (or, once renamed, the live ones);
    4. the pending weights, then the pending config, replace the live files (`finish_interrupted_save`).
    A save first finishes (or drops) whatever an interrupted earlier save left, so stale pending
    files never pair with new ones. PEFT's loader does not know step 3: in the moment between the
    two renames of step 4 it would read the new weights with the old config; the next lorakit
    save (or `finish_interrupted_save`) completes such a folder.
    """
    os.makedirs(directory, exist_ok=True)
    finish_interrupted_save(directory)
    weights_name = SAFETENSORS_NAME if safe else BIN_NAME
    tensors = _unshared(tensors)
    pending_weights = os.path.join(directory, pending_name(weights_name))
    pending_config = os.path.join(directory, pending_name(CONFIG_NAME))
    tmp_weights = _temp_path(directory, weights_name)
    tmp_config = _temp_path(directory, CONFIG_NAME)
    try:
        if safe:
            save_file(tensors, tmp_weights, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp_weights)
        _fsync(tmp_weights)
        with open(tmp_config, "w", encoding="utf-8") as fh:
            fh.write(config_text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_weights, pending_weights)
        _fsync_dir(directory)
        os.replace(tmp_config, pending_config)  # the commit point
        _fsync_dir(directory)
        finish_interrupted_save(directory)
    except BaseException:
        if not os.path.exists(pending_config) and os.path.exists(pending_weights):
            os.remove(pending_weights)  # not committed: the old pair stays the adapter
        raise
    finally:
        for tmp in (tmp_weights, tmp_config):
            if os.path.exists(tmp):
                os.remove(tmp)


def check_fits(slots: dict[str, Slot], state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError naming the first offending keys unless `state` fits `slots` exactly."""
    unexpected = sorted(set(state) - set(slots))
    missing = sorted(k for k, s in slots.items() if s.required and k not in state)
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)}, model {tuple(slots[k].tensor.shape)}"
        for k in set(state) & set(slots)
        if state[k].shape != slots[k].tensor.shape
    )
    not_float = sorted(f"{k} ({state[k].dtype})" for k in state if not state[k].is_floating_point())
    if not_float:
        raise ValueError(
            f"The adapter weights in {source} hold non-float tensors {_first(not_float)}: adapter factors are "
            "float tensors, so the file was not written by save_pretrained or is damaged. Save the adapter again."
        )
    problems = []
    if wrong_shape:
        problems.append(f"shape mismatch for {_first(wrong_shape)}")
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(
            f"unexpected keys {_first(unexpected)} (the model expects keys like {_first(sorted(slots))})"
        )
    if problems:
        raise ValueError(
            f"The adapter weights in {source} do not fit this model: "
            + "; ".join(problems)
            + ". Load it on the "
            "base model it was trained on, with its own adapter_config.json (r, target_modules, rank_pattern)."
        )
    not_finite = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if not_finite:
        raise ValueError(
            f"The adapter weights in {source} hold NaN or Inf values in {_first(not_finite)}: the adapter "
            "diverged in training or the file is damaged. Load an earlier checkpoint, or retrain with a lower "
            "learning rate (or gradient clipping)."
        )


def copy_into(slots: dict[str, Slot], state: dict[str, torch.Tensor]) -> None:
    """Copy every file tensor into its slot (dtype and device follow the model)."""
    with torch.no_grad():
        for key, value in state.items():
            target = slots[key].tensor
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous copies; a storage seen twice is cloned (safetensors forbids sharing)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def _first(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
