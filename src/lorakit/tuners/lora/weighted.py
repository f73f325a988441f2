"""`add_weighted_adapter`: a new LoRA adapter made from a weighted combination of existing ones.

Per adapted module, with adapters i present there, weights w_i and scalings s_i (alpha/r or
alpha/sqrt(r)), the true weight change of the mix is `M = sum_i w_i s_i B_i A_i`. The new adapter
has scaling 1 (r = lora_alpha = its rank, no rsLoRA), so its factors carry all of it:

- `cat`: `B = [B_1 ... B_n]`, `A = [w_1 s_1 A_1; ...]`: exactly M, rank sum r_i.
- `svd`: the best rank-k approximation of M (k = svd_rank, default the largest source rank),
  computed from the factors (`merge_utils.svd_of_factor_sum`), never from the dense M.
- `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the operator is applied
  to the dense changes `s_i B_i A_i` with weights w_i (as PEFT does), then the best rank-k SVD.
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the operator is applied to the A
  factors with weights `sign(c_i) sqrt|c_i|` and to the B factors with `sqrt|c_i|`, c_i = w_i s_i
  (PEFT's factor-wise heuristic; for `linear` the diagonal terms of the product are exact and the
  cross terms `B_i A_j` are the approximation). These need one rank per module.

Modules where an adapter is absent combine the adapters present. The result is computed in full
before anything is added to the model, so an error leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ... import merge_utils
from ...targeting import name_matches
from ..base import ModulesToSaveWrapper
from .config import LoraConfig
from .layer import Embedding, LoraLayer

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSE_SVD_TYPES = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("svd", "cat") + FACTOR_TYPES + DENSE_SVD_TYPES
# the operator each name applies to its task tensors (factors or dense changes)
_OPERATORS = {
    "linear": "linear",
    "ties": "ties",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
    "magnitude_prune": "magnitude_prune",
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}
_USES_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


@dataclasses.dataclass
class _Combined:
    """The new adapter's tensors for one module: A (rank, fan_in), B (rows, rank), bias or None."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    bias: torch.Tensor | None


def add_weighted_adapter(
    lora_model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, **options
) -> None:
    """Plan the combination (`plan_weighted_adapter`) and add it to `lora_model`, a `LoraModel`
    (`peft_model.base_model`), whose `inject_adapter` fills the new adapter inside its undo scope."""
    plan = plan_weighted_adapter(
        lora_model.model, lora_model.peft_config, adapters, weights, adapter_name, **options
    )
    lora_model.inject_adapter(adapter_name, plan.config, then=lambda _, name: plan.fill(name))


@dataclasses.dataclass
class WeightedPlan:
    """A combined adapter ready to add: its config, and per module what `fill` stores in it."""

    config: LoraConfig
    modules: dict[str, nn.Module]
    combined: dict[str, _Combined]
    saved_copies: dict[str, str]  # modules_to_save name -> the source adapter whose copy is taken

    def fill(self, adapter_name: str) -> None:
        """Store the combined factors (and trained copies) in the just-injected `adapter_name`."""
        for name, result in self.combined.items():
            _store(self.modules[name], adapter_name, result)
        for name, source in self.saved_copies.items():
            wrapper = self.modules[name]
            wrapper.modules_to_save[adapter_name].load_state_dict(
                wrapper.modules_to_save[source].state_dict()
            )


def plan_weighted_adapter(
    model: nn.Module,
    configs: dict,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    progressbar: bool = False,
) -> WeightedPlan:
    """Plan adapter `adapter_name` combining `adapters` with `weights` (PEFT's `add_weighted_adapter`);
    nothing is changed until the plan is injected (`add_weighted_adapter`, `LoraModel`).

    The new adapter is inactive (call `set_adapter(adapter_name)`) and frozen, like PEFT's.

    Args:
        model: the adapted model (`LoraModel.model`); configs: its adapters' configs by name.
        adapters: names of existing adapters; plain LoRA (DoRA adapters are refused).
        weights: one number per adapter; negative subtracts. For TIES forms a negative weight
            negates the adapter before the sign election.
        adapter_name: name of the new adapter; must not exist yet.
        combination_type: one of `COMBINATION_TYPES` (see the module docstring).
        svd_rank: rank of the `svd` and `*_svd` results (default: the largest source rank). A
            module whose change has lower rank is zero-padded to it.
        svd_clamp: quantile q in [0, 1]; the SVD factors are clamped to [-hi, hi], hi their
            q-quantile (PEFT's rule). Singular pairs have a fixed sign (`merge_utils.canonical_signs`).
        svd_full_matrices: accepted for PEFT compatibility; the result never depends on it (only
            the leading singular vectors are used, so the reduced SVD is always computed).
        svd_driver: `torch.linalg.svd` driver ("gesvd", "gesvdj", "gesvda") used on CUDA; ignored
            with a warning on CPU, where torch has a single SVD driver.
        density: fraction of entries kept, in (0, 1]; required by the ties, dare and
            magnitude_prune forms, ignored (with a warning) by the others.
        majority_sign_method: "total" or "frequency", for the ties forms.
        progressbar: show a progress bar over the adapted modules.

    Raises:
        ValueError: unknown adapters or combination type, an existing `adapter_name`, a weight
            count that differs from the adapter count, a density outside (0, 1], ranks that differ
            in one module for a form that needs one rank, DoRA adapters, several adapters with a
            trained copy of one `modules_to_save` module. The model is unchanged then.
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check_adapters(configs, adapters, weights, adapter_name)
    _check_options(combination_type, svd_rank, svd_clamp, svd_driver, density, majority_sign_method)
    modules = dict(model.named_modules())
    layers = _layers_with(modules, adapters)
    _check_layers(layers, adapters, combination_type)
    ranks = {a: max((layer.r[a] for _, layer in layers if a in layer.r), default=0) for a in adapters}
    if combination_type == "cat":
        new_rank = sum(ranks.values())
    elif combination_type in FACTOR_TYPES:
        new_rank = max(ranks.values())
    else:
        new_rank = svd_rank or max(ranks.values())
    driver = _driver_for(svd_driver, layers)
    combined: dict[str, _Combined] = {}
    for name, layer in tqdm(layers, disable=not progressbar, desc=f"Combining adapters ({combination_type})"):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
        combined[name] = _combine(
            layer, present, combination_type, new_rank, svd_clamp, driver, density, majority_sign_method
        )
    saved_copies = _modules_to_save_sources(modules, adapters)
    config = _new_config(configs[adapters[0]], modules, new_rank, combined, saved_copies)

    return WeightedPlan(config, modules, combined, saved_copies)


# ---- checks -------------------------------------------------------------------------------------
def _check_adapters(configs: dict, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    known = list(configs)
    if not adapters:
        raise ValueError("adapters is empty; name at least one adapter to combine.")
    unknown = [a for a in adapters if a not in known]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; this model has {known}.")
    if len(weights) != len(adapters):
        raise ValueError(
            f"Got {len(weights)} weights for {len(adapters)} adapters {adapters}; give one weight per adapter."
        )
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights={weights} must be finite numbers.")
    if adapter_name in known:
        raise ValueError(
            f"An adapter named {adapter_name!r} already exists; pick a new name for the combined adapter "
            f"(or delete_adapter({adapter_name!r}) first)."
        )
    for adapter in adapters:
        if not isinstance(configs[adapter], LoraConfig):
            raise ValueError(
                f"Adapter {adapter!r} is a {configs[adapter].peft_type} adapter; add_weighted_adapter "
                "combines LoRA adapters only (a bottleneck adapter has no low-rank weight change)."
            )
        if getattr(configs[adapter], "use_dora", False):
            raise ValueError(
                f"Adapter {adapter!r} is a DoRA adapter: its weight change rescales the whole weight and is not "
                "low-rank, so it cannot be combined into a LoRA adapter. Merge it with merge_and_unload, or "
                "combine plain LoRA adapters only."
            )


def _check_options(combination_type, svd_rank, svd_clamp, svd_driver, density, majority_sign_method) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"combination_type={combination_type!r} is unknown; use one of {list(COMBINATION_TYPES)}."
        )
    if svd_rank is not None and (
        isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0
    ):
        raise ValueError(f"svd_rank={svd_rank!r} must be a positive integer or None.")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ValueError(f"svd_clamp={svd_clamp!r} must be a quantile in [0, 1] (e.g. 0.99) or None.")
    if svd_driver not in _SVD_DRIVERS:
        raise ValueError(
            f"svd_driver={svd_driver!r} is not a torch.linalg.svd driver; use one of {_SVD_DRIVERS}."
        )
    needs_density = _OPERATORS.get(combination_type) in _USES_DENSITY
    if needs_density:
        if density is None:
            raise ValueError(
                f"combination_type={combination_type!r} needs density: the fraction of entries kept, in (0, 1]."
            )
        if not 0 < density <= 1:
            raise ValueError(f"density={density!r} must be in (0, 1]: the fraction of entries kept.")
    elif density is not None:
        warnings.warn(
            f"density={density} has no effect with combination_type={combination_type!r}.", stacklevel=3
        )
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={majority_sign_method!r} must be 'total' or 'frequency'.")


def _layers_with(modules: dict[str, nn.Module], adapters: list[str]) -> list[tuple[str, LoraLayer]]:
    """(module name, layer) for every LoRA layer holding at least one of `adapters`, in model order."""
    return [
        (name, module)
        for name, module in modules.items()
        if isinstance(module, LoraLayer) and any(a in module.r for a in adapters)
    ]


def _check_layers(layers: list[tuple[str, LoraLayer]], adapters: list[str], combination_type: str) -> None:
    if not layers:
        raise ValueError(f"No module of the model holds any of the adapters {adapters}.")
    with_bias = [
        a for _, layer in layers for a in adapters if a in layer.lora_B and layer.lora_B[a].bias is not None
    ]
    embeddings = [name for name, layer in layers if isinstance(layer, Embedding)]
    if with_bias and embeddings:
        raise ValueError(
            f"Adapter {with_bias[0]!r} has a lora_bias, which the combined adapter must carry, but the combined "
            f"adapter also covers Embedding {embeddings[0]!r}, where LoRA has no bias. Combine the adapters on "
            "the embeddings and the others separately."
        )
    for name, layer in layers:
        if combination_type in FACTOR_TYPES:
            ranks = {a: layer.r[a] for a in adapters if a in layer.r}
            if len(set(ranks.values())) > 1:
                raise ValueError(
                    f"combination_type={combination_type!r} combines A and B factors entry by entry, so it needs "
                    f"one rank per module, but {name!r} has ranks {ranks}. Use 'cat' or an SVD form ('svd', "
                    f"{', '.join(repr(t) for t in DENSE_SVD_TYPES)}), which accept different ranks."
                )


def _driver_for(svd_driver: str | None, layers: list[tuple[str, LoraLayer]]) -> str | None:
    if svd_driver is None:
        return None
    if any(layer.base_layer.weight.device.type != "cuda" for _, layer in layers):
        warnings.warn(
            f"svd_driver={svd_driver!r} is a cuSOLVER option; it is ignored for adapters on CPU (torch has one SVD "
            "driver there).",
            stacklevel=3,
        )
        return None
    return svd_driver


def _modules_to_save_sources(modules: dict[str, nn.Module], adapters: list[str]) -> dict[str, str]:
    """{wrapper name: the one source adapter with a trained copy}; raise if several have one."""
    sources = {}
    for name, module in modules.items():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        holders = list(dict.fromkeys(a for a in adapters if a in module.modules_to_save))
        if len(holders) > 1:
            raise ValueError(
                f"Adapters {holders} each train their own copy of {name!r} (modules_to_save); full copies cannot "
                "be combined. Combine at most one adapter that saves a given module."
            )
        if holders:
            sources[name] = holders[0]
    return sources


# ---- the combination of one module ----------------------------------------------------------------
def _factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter `adapter`'s A (r, fan_in) and B (rows, r) in `layer`, as 2-D views (conv kernels
    flattened into fan_in), so that `B @ A` is the change in the layer's rows layout."""
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter].detach(), layer.lora_embedding_B[adapter].detach()
    lora_a, lora_b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
    return lora_a.flatten(1), lora_b.flatten(1)


def _combine(
    layer: LoraLayer,
    present: list[tuple[str, float]],
    combination_type: str,
    rank: int,
    svd_clamp: float | None,
    driver: str | None,
    density: float | None,
    majority_sign_method: str,
) -> _Combined:
    factors = [_factors(layer, a) for a, _ in present]
    dtype = torch.promote_types(factors[0][0].dtype, torch.float32)
    lora_as = [a.to(dtype) for a, _ in factors]
    lora_bs = [b.to(dtype) for _, b in factors]
    coefficients = [w * layer.scaling[a] for a, w in present]  # c_i = w_i s_i
    device = lora_as[0].device
    if combination_type == "cat":
        lora_a = torch.cat([a * c for a, c in zip(lora_as, coefficients)])
        lora_b = torch.cat(lora_bs, dim=1)
    elif combination_type == "svd":
        u, singular, vh = merge_utils.svd_of_factor_sum(
            lora_bs, lora_as, torch.tensor(coefficients, dtype=dtype), driver, rank
        )
        lora_b, lora_a = merge_utils.low_rank_factors(u, singular, vh, rank, svd_clamp)
    elif combination_type in DENSE_SVD_TYPES:
        deltas = [(b @ a) * layer.scaling[name] for (name, _), a, b in zip(present, lora_as, lora_bs)]
        weights = torch.tensor([w for _, w in present], dtype=dtype, device=device)
        merged = _apply(_OPERATORS[combination_type], deltas, weights, density, majority_sign_method)
        lora_b, lora_a = merge_utils.low_rank_factors(*merge_utils.svd(merged, driver), rank, svd_clamp)
    else:
        roots = [math.sqrt(abs(c)) for c in coefficients]
        weights_a = torch.tensor([math.copysign(r, c) for r, c in zip(roots, coefficients)], dtype=dtype)
        weights_b = torch.tensor(roots, dtype=dtype)
        operator = _OPERATORS[combination_type]
        lora_a = _apply(operator, lora_as, weights_a.to(device), density, majority_sign_method)
        lora_b = _apply(operator, lora_bs, weights_b.to(device), density, majority_sign_method)
    return _Combined(*_pad(lora_a, lora_b, rank), _combined_bias(layer, present))


def _apply(operator: str, tensors, weights, density, majority_sign_method) -> torch.Tensor:
    if operator == "linear":
        return merge_utils.task_arithmetic(tensors, weights)
    if operator == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, weights, density)
    if operator == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, density)
    if operator == "ties":
        return merge_utils.ties(tensors, weights, density, majority_sign_method)
    return merge_utils.dare_ties(tensors, weights, density, majority_sign_method)


def _pad(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and columns of B up to `rank` (they add nothing to `B @ A`)."""
    missing = rank - lora_a.shape[0]
    if missing > 0:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(missing, lora_a.shape[1])])
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], missing)], dim=1)
    return lora_a, lora_b


def _combined_bias(layer: LoraLayer, present: list[tuple[str, float]]) -> torch.Tensor | None:
    """`sum_i w_i s_i b_i` over the present adapters with a lora_bias, or None if none has one."""
    terms = [
        layer.lora_B[a].bias.detach() * (w * layer.scaling[a])
        for a, w in present
        if a in layer.lora_B and layer.lora_B[a].bias is not None
    ]
    return torch.stack(terms).sum(dim=0) if terms else None


def _store(layer: LoraLayer, adapter_name: str, result: _Combined) -> None:
    layer.set_factors(adapter_name, result.lora_a, result.lora_b)
    if result.bias is not None:
        with torch.no_grad():
            layer.lora_B[adapter_name].bias.copy_(result.bias)


# ---- the new adapter's config -----------------------------------------------------------------------
def _new_config(
    first: LoraConfig, modules: dict[str, nn.Module], rank: int, combined: dict[str, _Combined], saved_copies
) -> LoraConfig:
    """The first adapter's config with the new rank, scaling 1 (lora_alpha = r, no rsLoRA), explicit
    targets, plain LoRA init and no per-module patterns or layer filters."""
    return dataclasses.replace(
        first,
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        target_modules=_target_names(modules, set(combined)),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights=True,
        loftq_config={},
        use_dora=False,
        lora_bias=any(result.bias is not None for result in combined.values()),
        modules_to_save=sorted(saved_copies) or None,
    )


def _target_names(modules: dict[str, nn.Module], names: set[str]) -> set[str]:
    """The leaf names of `names` when they select exactly `names` in the model (PEFT's usual
    form, e.g. {'q_proj', 'v_proj'}), else the full module names."""
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    selected = {name for name in modules if name and name_matches(name, leaves) and not _inside_wrapper(name)}
    return leaves if selected == names else set(names)


def _inside_wrapper(name: str) -> bool:
    parts = name.split(".")
    return any(
        p in ("base_layer", "original_module", "modules_to_save") or p.startswith("lora_") for p in parts
    )
