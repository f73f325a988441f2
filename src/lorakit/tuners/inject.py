"""Wrapping a model's modules, shared by every adapter family: each change is recorded as an
undo action as it is made, so the caller (`LoraModel.inject_adapter`) can put back everything a
failed injection touched."""

from __future__ import annotations

from torch import nn

from ..config import TASK_HEAD_MODULES, PeftConfig
from ..targeting import is_internal_name, name_matches
from .base import ModulesToSaveWrapper


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module holding `name`, the attribute it is held under)."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module, undo: list) -> None:
    """Put `new` where `name` is, and record how to put the old module back."""
    parent, attr = parent_of(model, name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    undo.append(lambda: setattr(parent, attr, old))


def add_module_to_save(model: nn.Module, name: str, adapter_name: str, active: list[str], undo: list) -> None:
    """Give `adapter_name` a trained copy of module `name` (wrapping it on first use)."""
    target = model.get_submodule(name)
    if isinstance(target, ModulesToSaveWrapper):
        target.add_copy(adapter_name)
        undo.append(lambda: target.delete_adapter(adapter_name))
        return
    wrapper = ModulesToSaveWrapper(target, adapter_name)
    wrapper.set_adapter(active)
    replace_module(model, name, wrapper, undo)


def modules_to_save_targets(config: PeftConfig, kinds: dict[str, str], adapted: set[str]) -> list[str]:
    """The module names `config.modules_to_save` selects (plus the task's head, when present).

    Raises:
        ValueError: an entry matches nothing, or a module is both adapted and to be saved.
    """
    wanted = getattr(config, "modules_to_save", None) or []
    automatic = set(TASK_HEAD_MODULES.get(config.task_type or "", ()))
    names = [n for n in kinds if n and not is_internal_name(n)]
    chosen = []
    for key in wanted:
        hits = [n for n in names if name_matches(n, [key])]
        if not hits and key not in automatic:
            raise ValueError(
                f"modules_to_save entry {key!r} matched no module of the model; "
                f"check the name (top-level children: {', '.join(n for n in names if '.' not in n)})."
            )
        chosen += hits
    clash = sorted(set(chosen) & adapted)
    if clash:
        raise ValueError(
            f"{clash[0]!r} is both an adapter target and in modules_to_save; a module is either adapted or "
            "trained in full. Remove it from one of the two."
        )
    return list(dict.fromkeys(chosen))
