"""`AdapterLayer`: the one home of adapter bookkeeping shared by every layer type.

A wrapped module keeps the original as `base_layer` and adapters by name. Merge, unmerge,
enable/disable, the active set and deletion live here once; a layer type only says how to build an
adapter, compute its weight change and run its forward.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

BASE_ADAPTER_NAME = "__base__"  # a per-sample adapter name meaning "no adapter"


class _CallState(threading.local):
    """Per-thread, per-call state: {id(layer): one adapter name per sample} while mixed batches run.

    Never a module attribute: threads share modules, and checkpoint recomputation runs after the
    call has returned (see `bind_sample_adapters`). Replaced, never changed in place, so a captured
    mapping stays as it was."""

    def __init__(self) -> None:
        self.sample_adapters: dict[int, list[str]] = {}


_call = _CallState()


def sample_adapters_of(module: nn.Module) -> list[str] | None:
    """The per-sample adapter names `module` runs with in this thread's current call, or None."""
    mapping = _call.sample_adapters
    return mapping.get(id(module)) if mapping else None


@contextlib.contextmanager
def running_sample_adapters(mapping: dict[int, list[str]]) -> Iterator[None]:
    """Within the block (this thread only), the module with id k gives sample i `mapping[k][i]`."""
    previous = _call.sample_adapters
    _call.sample_adapters = {**previous, **mapping} if previous else dict(mapping)
    try:
        yield
    finally:
        _call.sample_adapters = previous


def bind_sample_adapters(checkpoint: Callable) -> Callable:
    """Wrap an activation-checkpointing function (transformers' `_gradient_checkpointing_func`) so
    the function it checkpoints runs with the per-sample adapters of the call that checkpointed it,
    in its forward and again in its recomputation during backward (reentrant or not), which happens
    after that call has returned and possibly on another thread."""
    if getattr(checkpoint, "binds_sample_adapters", False):
        return checkpoint

    @functools.wraps(checkpoint)
    def checkpoint_with_sample_adapters(function: Callable, *args, **kwargs):
        mapping = _call.sample_adapters
        if mapping:
            function = functools.partial(_run_with, mapping, function)
        return checkpoint(function, *args, **kwargs)

    checkpoint_with_sample_adapters.binds_sample_adapters = True
    return checkpoint_with_sample_adapters


def _run_with(mapping: dict[int, list[str]], function: Callable, *args, **kwargs):
    previous = _call.sample_adapters
    _call.sample_adapters = mapping
    try:
        return function(*args, **kwargs)
    finally:
        _call.sample_adapters = previous


class _SampleAdapters:
    """`module.sample_adapters`: this thread's per-sample names for the module (see `_CallState`);
    setting it (a list, or None to clear) affects only the current thread."""

    def __get__(self, module, owner=None):
        return self if module is None else sample_adapters_of(module)

    def __set__(self, module, names: list[str] | None) -> None:
        mapping = {k: v for k, v in _call.sample_adapters.items() if k != id(module)}
        if names is not None:
            mapping[id(module)] = list(names)
        _call.sample_adapters = mapping


class ActiveSet:
    """The active-adapter state every adapted module shares (AdapterLayer, ModulesToSaveWrapper):
    which adapters run, whether adapters are disabled, which never train, and the per-sample names
    of a mixed batch. Subclasses say which trainable holder belongs to which adapter (`_holders`)."""

    # one adapter name per sample while this thread runs a mixed batch (`adapter_names=`), else None
    sample_adapters = _SampleAdapters()

    def _init_active_set(self) -> None:
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.frozen_adapters: set[str] = set()  # adapters in inference mode never train

    def _holders(self) -> Iterator[tuple[str, nn.Module]]:
        """(adapter name, module holding its trainable tensors), every pair."""
        raise NotImplementedError

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make `adapter_names` the active set; active adapters train unless loaded for inference
        (`frozen_adapters`), the others freeze."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for key, holder in self._holders():
            holder.requires_grad_(key in names and key not in self.frozen_adapters)
        self._active_adapter = names


class AdapterLayer(ActiveSet, nn.Module):
    """Base class of adapted layers.

    Subclasses set `adapter_layer_names` (containers holding trainable per-adapter tensors, keyed
    by adapter name) and `other_param_names` (per-adapter dicts of plain values), and implement
    `get_delta_weight(name)`, the change adapter `name` makes to `base_layer.weight`, in the base
    weight's own layout and dtype.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    supports_mixed_batches = False  # True where forward honours `sample_adapters`

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._init_active_set()
        self.merged_adapters: list[str] = []
        self.module_name = ""  # set by the model, used in error messages

    def get_base_layer(self) -> nn.Module:
        """The original module this layer wraps."""
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code written for the plain module reads it, e.g. tied embeddings)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ---- the active set -------------------------------------------------------------------
    def _holders(self) -> Iterator[tuple[str, nn.Module]]:
        for container in self.adapter_layer_names:
            yield from getattr(self, container).items()

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds, in insertion order."""
        names: dict[str, None] = {}
        for container in self.adapter_layer_names:
            names.update(dict.fromkeys(getattr(self, container).keys()))
        return list(names)

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapters on or off; off means the base layer alone (frozen adapters)."""
        if enabled:
            self.set_adapter(self._active_adapter)
        else:
            for container in self.adapter_layer_names:
                getattr(self, container).requires_grad_(False)
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove `adapter_name`; if it was active, the first remaining adapter becomes active."""
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into {self.module_name or 'this layer'}; "
                "unmerge_adapter() before deleting it."
            )
        for container in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, container)
            if adapter_name in holder:
                del holder[adapter_name]
        if adapter_name in self._active_adapter:
            remaining = [n for n in self._active_adapter if n != adapter_name]
            if not remaining and self.adapter_names:
                remaining = [self.adapter_names[0]]
            self.set_adapter(remaining)

    # ---- merging ----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def get_delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        """The change `adapter_name` makes to the base bias (lora_bias), or None."""
        return None

    def check_finite(self, adapter_name: str, with_base: bool) -> None:
        """Raise if the adapter (or, with `with_base`, the merged weight) holds NaN or Inf."""
        where = f"adapter {adapter_name!r} in module {self.module_name or type(self.base_layer).__name__!r}"
        for container in self.adapter_layer_names:
            holder = getattr(self, container)
            if adapter_name in holder:
                for tensor in _tensors(holder[adapter_name]):
                    if not torch.isfinite(tensor).all():
                        raise ValueError(
                            f"NaN/Inf in {where} ({container}); refusing to merge. The adapter is broken "
                            "(diverged training?): load a good checkpoint or retrain with a lower learning rate."
                        )
        if with_base:
            merged = self.base_layer.weight.detach() + self.get_delta_weight(adapter_name)
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"Merging {where} would put NaN/Inf into the base weight; refusing to merge "
                    "(the base weights are unchanged)."
                )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the weight change of `adapter_names` (default: the active ones) into the base weight.

        Args:
            safe_merge: check the merged weight for NaN/Inf before writing it.
        Raises:
            ValueError: non-finite adapter weights (checked always) or merged weights (safe_merge);
                the base layer is unchanged then.
        """
        names = self._mergeable(adapter_names)
        self._check_merge_allowed(names)
        for name in names:
            self.check_finite(name, with_base=safe_merge)
        for name in names:
            with torch.no_grad():
                self._merge_weight(name)
                delta_bias = self.get_delta_bias(name)
                if delta_bias is not None:
                    self._base_bias_for_merge().data += delta_bias
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merged adapter, newest first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self._unmerge_weight(name)
                delta_bias = self.get_delta_bias(name)
                if delta_bias is not None:
                    self.base_layer.bias.data -= delta_bias

    def _merge_weight(self, adapter_name: str) -> None:
        """Add adapter `adapter_name`'s change into the base weight (additive by default)."""
        self.base_layer.weight.data += self.get_delta_weight(adapter_name)

    def _unmerge_weight(self, adapter_name: str) -> None:
        """Take adapter `adapter_name`'s change back out of the base weight (additive by default)."""
        self.base_layer.weight.data -= self.get_delta_weight(adapter_name)

    def _check_merge_allowed(self, names: list[str]) -> None:
        """Raise if merging `names` (on top of `merged_adapters`) would not be exact."""

    def _mergeable(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        held = set(self.adapter_names)
        return [n for n in names if n in held and n not in self.merged_adapters]

    def _base_bias_for_merge(self) -> nn.Parameter:
        base = self.base_layer
        if base.bias is None:
            out_features = (
                base.weight.shape[1] if getattr(self, "fan_in_fan_out", False) else base.weight.shape[0]
            )
            base.bias = nn.Parameter(
                torch.zeros(out_features, dtype=base.weight.dtype, device=base.weight.device),
                requires_grad=False,
            )
        return base.bias

    def __repr__(self) -> str:
        return f"lorakit.{type(self).__name__}(\n  {super().__repr__()}\n)"


class ModulesToSaveWrapper(ActiveSet, nn.Module):
    """A module trained in full: one copy per adapter beside the frozen original.

    `original_module` runs when adapters are disabled or the active adapter has no copy.
    """

    supports_mixed_batches = True

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._init_active_set()
        self.add_copy(adapter_name)

    def add_copy(self, adapter_name: str) -> None:
        module_copy = copy.deepcopy(self.original_module)
        module_copy.requires_grad_(True)
        self.modules_to_save[adapter_name] = module_copy
        self.original_module.requires_grad_(False)

    def _holders(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(self.modules_to_save.items())

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if adapter_name in self._active_adapter:
            self.set_adapter([n for n in self._active_adapter if n != adapter_name])

    def current_module(self) -> nn.Module:
        """The module the forward uses now."""
        if not self._disable_adapters:
            for name in self._active_adapter:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        names = sample_adapters_of(self)
        if names is None or self._disable_adapters:
            return self.current_module()(*args, **kwargs)
        if not args:
            raise ValueError(
                f"A mixed batch (adapter_names=) splits the first positional input of this "
                f"{type(self.original_module).__name__}, but it was called with keyword arguments only."
            )
        x, rest = args[0], args[1:]

        def run(name: str, index: slice | torch.Tensor) -> torch.Tensor:
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            return module(x[index], *rest, **kwargs)

        return per_sample(names, x, run, type(self.original_module).__name__)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            # user code reads attributes of the wrapped module (e.g. `classifier.out_features`)
            return getattr(self.current_module(), name)


def per_sample(
    names: list[str], x: torch.Tensor, run: Callable[[str, slice | torch.Tensor], torch.Tensor], where: str
) -> torch.Tensor:
    """Run a mixed batch: `run(name, index)` computes the output rows of the samples at `index`
    (a slice when they are contiguous) with adapter `name`; the pieces are put back in sample order.

    Args:
        names: one adapter name per sample (`"__base__"`: none).
        x: the layer input, batch first: (batch, ...).
        where: the layer's name, for the error.
    Raises:
        ValueError: `len(names)` is not the batch size.
    """
    batch = x.shape[0]
    positions = group_positions(names, batch, where)
    if len(positions) <= 1:  # one adapter, or an empty batch (which keeps its shape, as PEFT)
        return run(names[0] if names else BASE_ADAPTER_NAME, slice(None))
    if is_contiguous(positions):  # blocks of samples per adapter: slices are views, no gather needed
        groups = sorted(positions.items(), key=lambda item: item[1][0])
        return torch.cat([run(name, slice(p[0], p[-1] + 1)) for name, p in groups])
    pieces, order = [], []
    for name, p in positions.items():
        index = torch.tensor(p)
        pieces.append(run(name, index.to(x.device)))
        order += p
    inverse = torch.empty(batch, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(batch)
    out = torch.cat(pieces)
    return out.index_select(0, inverse.to(out.device))


def group_positions(names: list[str], batch: int, where: str) -> dict[str, list[int]]:
    """Sample positions per adapter name, in order of first appearance.

    Raises:
        ValueError: `len(names) != batch` (`where` names the layer in the message).
    """
    if len(names) != batch:
        raise ValueError(
            f"adapter_names has {len(names)} entries but {where!r} got a batch of {batch} samples; "
            "pass exactly one adapter name per sample."
        )
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        positions.setdefault(name, []).append(i)
    return positions


def sample_runs(names: list[str]) -> list[tuple[str, int, int]]:
    """Runs of consecutive samples with the same adapter: `(name, start, stop)` in sample order."""
    runs: list[tuple[str, int, int]] = []
    for i, name in enumerate(names):
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1], i + 1)
        else:
            runs.append((name, i, i + 1))
    return runs


def is_contiguous(positions: dict[str, list[int]]) -> bool:
    """Whether every adapter's samples form one contiguous block."""
    return all(p[-1] - p[0] + 1 == len(p) for p in positions.values())


def _tensors(holder) -> list[torch.Tensor]:
    if isinstance(holder, torch.Tensor):
        return [holder]
    return [p for p in holder.parameters()]
