"""Layer replication: grow a model's block stack by repeating blocks that share base weights.

`layer_replication=[[0, 4], [2, 5]]` turns blocks 0..4 into 0,1,2,3,2,3,4: repeated blocks are
new modules whose parameters *are* the originals' (no extra weight memory), so only their LoRA
adapters differ (PEFT's `layer_replication`, after the "expanded LoRA" recipe of
Kim et al. 2023, arXiv:2312.15166).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

_STACK_NAMES = ("layers", "h", "layer", "blocks", "block")


def find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's ModuleList of transformer blocks (`model.layers`, `transformer.h`, ...).

    Raises:
        ValueError: none, or several candidates.
    """
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.split(".")[-1] in _STACK_NAMES
        and (expected is None or len(module) == expected)
    ]
    if len(found) != 1:
        names = [n for n, _ in found] or "none"
        raise ValueError(
            f"layer_replication needs exactly one stack of transformer blocks (a ModuleList named one of "
            f"{_STACK_NAMES} with config.num_hidden_layers entries); found {names}."
        )
    return found[0]


def replicate_layers(model: nn.Module, layer_map: list[list[int]]) -> Callable[[], None]:
    """Rebuild the block stack from `[start, end)` ranges of the original blocks; returns an undo.

    The first use of each original block is the block itself; every later use is a copy whose
    parameters and buffers are the original's tensors. Attributes named `layer_idx` (the KV-cache
    slot of attention modules) are renumbered to the new positions, and `config.num_hidden_layers`
    (and `config.layer_types` when present) follow the new stack.

    Raises:
        ValueError: a range is empty or outside the model.
    """
    stack_name, stack = find_block_stack(model)
    count = len(stack)
    order: list[int] = []
    for pair in layer_map:
        if len(pair) != 2 or not 0 <= pair[0] < pair[1] <= count:
            raise ValueError(
                f"layer_replication range {pair!r} is not [start, end) with 0 <= start < end <= {count} "
                f"(the model has {count} blocks)."
            )
        order += list(range(pair[0], pair[1]))
    used: set[int] = set()
    blocks = []
    for index in order:
        blocks.append(stack[index] if index not in used else _shared_copy(stack[index]))
        used.add(index)
    old_idx = {id(m): m.layer_idx for m in stack.modules() if hasattr(m, "layer_idx")}
    for position, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    parent_name, _, attr = stack_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList(blocks))
    config = getattr(model, "config", None)
    old_config = {k: getattr(config, k) for k in ("num_hidden_layers", "layer_types") if hasattr(config, k)}
    if config is not None:
        config.num_hidden_layers = len(blocks)
        if isinstance(old_config.get("layer_types"), list):
            config.layer_types = [old_config["layer_types"][i] for i in order]

    def undo() -> None:
        setattr(parent, attr, stack)
        for module in stack.modules():
            if id(module) in old_idx:
                module.layer_idx = old_idx[id(module)]
        for key, value in old_config.items():
            setattr(config, key, value)

    return undo


def _shared_copy(block: nn.Module) -> nn.Module:
    """A structural copy of `block` whose parameters and buffers are `block`'s own tensors."""
    clone = copy.deepcopy(block)
    originals = dict(block.named_modules())
    for name, module in clone.named_modules():
        source = originals[name]
        for key in module._parameters:
            module._parameters[key] = source._parameters[key]
        for key in module._buffers:
            module._buffers[key] = source._buffers[key]
    return clone
