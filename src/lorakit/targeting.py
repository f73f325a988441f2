"""Which modules get an adapter, and with what rank and alpha.

The plan is computed from module names and a coarse kind per module (see `ModuleKind`), never
from weights: `plan_targets(kinds, config) -> {name: TargetPlan}`. The model code supplies the
kinds and carries out the plan.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from .names import INTERNAL_PARTS
from .tuners.lora.config import LoraConfig

# Module kinds the planner distinguishes. "adapted" is a module already wrapped by lorakit.
SUPPORTED_KINDS = ("linear", "conv1d_gpt2", "embedding", "conv", "adapted")
LINEAR_KINDS = ("linear", "conv1d_gpt2")
SUPPORTED_TYPES_TEXT = "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d"

# model_type -> default target_modules, for `target_modules=None` (same choices as PEFT's table).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "stablelm": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}


@dataclass(frozen=True)
class TargetPlan:
    """What one module gets: rank `r`, `alpha`, and the resulting `scaling`."""

    r: int
    alpha: float
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


def name_matches(name: str, patterns: set[str] | list[str] | str) -> bool:
    """PEFT's matching rule: a str is `re.fullmatch`ed; a list matches exactly or as a `.`-suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The block index in `name` (`model.layers.3.mlp` -> 3), or None when it has none."""
    if layers_pattern is None:
        match = re.match(r"(?:.*\.)?[^.]*\.(\d+)\.", name)
        return int(match.group(1)) if match else None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    for pattern in patterns:
        match = re.match(rf"(?:.*\.)?{pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def pattern_value(pattern: dict, name: str, default: float) -> float:
    """Value of the first `pattern` key matching `name` at a dot boundary, else `default`."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def resolve_target_modules(
    config: LoraConfig, kinds: dict[str, str], model_type: str | None, output_head: str | None
) -> set[str] | str:
    """Turn None / "all-linear" into explicit targets; other values pass through.

    Args:
        kinds: module name -> kind for every module of the model.
        model_type: `model.config.model_type` when the model has one.
        output_head: name of the output projection (`lm_head`), excluded by "all-linear".
    """
    targets = config.target_modules
    if targets is None:
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"target_modules=None, and lorakit has no default targets for model_type={model_type!r}; "
                "pass target_modules explicitly, e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'. "
                f"Linear modules of this model: {_sample(_leaf_names(kinds, LINEAR_KINDS))}."
            )
        return set(DEFAULT_TARGET_MODULES[model_type])
    if isinstance(targets, str) and targets == "all-linear":
        skip = set(config.modules_to_save or [])
        chosen = {
            name
            for name, kind in kinds.items()
            if kind.split(":")[-1] in LINEAR_KINDS
            and name != output_head
            and not name_matches(name, skip)
            and not is_internal_name(name)
        }
        if not chosen:
            raise ValueError(
                "target_modules='all-linear' found no Linear or Conv1D module besides the output head."
            )
        return chosen
    return targets


def select_targets(
    kinds: dict[str, str], config, targets: set[str] | str, adaptable: tuple[str, ...] | None = None
) -> list[str]:
    """The module names `targets` selects, after `exclude_modules` and `layers_to_transform`.

    Shared by every adapter family: `config` needs `exclude_modules`, `layers_to_transform` and
    `layers_pattern`. `adaptable` (kinds) narrows the names suggested when nothing matches.

    Raises:
        ValueError: nothing matches (with near names), everything matched is excluded, or
            `layers_to_transform` leaves nothing.
    """
    names = [n for n in kinds if n and not is_internal_name(n)]
    matched = [n for n in names if name_matches(n, targets)]
    if not matched:
        hints = [n for n in names if adaptable is None or kinds[n].split(":")[-1] in adaptable]
        raise ValueError(_no_match_message(targets, hints or names, "target_modules"))
    excluded = config.exclude_modules
    if excluded is not None:
        kept = [n for n in matched if not name_matches(n, excluded)]
        if not kept:
            raise ValueError(
                f"Every module matched by target_modules ({_sample(matched)}) is excluded by "
                f"exclude_modules={_show(excluded)}; nothing would be adapted."
            )
        matched = kept
    if config.layers_to_transform is not None:
        wanted = config.layers_to_transform
        wanted = {wanted} if isinstance(wanted, int) else set(wanted)
        indices = {n: layer_index(n, config.layers_pattern) for n in matched}
        kept = [n for n in matched if indices[n] in wanted]
        if not kept:
            found = sorted({i for i in indices.values() if i is not None})
            raise ValueError(
                f"layers_to_transform={config.layers_to_transform!r} (layers_pattern={config.layers_pattern!r}) "
                f"selected none of the matched modules; layer indices found among them: {found or 'none'}."
            )
        matched = kept
    return matched


def plan_targets(kinds: dict[str, str], config: LoraConfig, targets: set[str] | str) -> dict[str, TargetPlan]:
    """Choose the modules to adapt and their rank/alpha.

    Args:
        kinds: module name -> kind ("linear", "conv1d_gpt2", "embedding", "conv", "adapted:<kind>",
            or "other:<TypeName>") for every module of the model.
        targets: `resolve_target_modules`'s result.

    Raises:
        ValueError: as `select_targets`, or a match is of a type LoRA cannot adapt.
    """
    matched = select_targets(kinds, config, targets, SUPPORTED_KINDS)
    unsupported = [n for n in matched if kinds[n].split(":")[-1] not in SUPPORTED_KINDS]
    if unsupported:
        first = unsupported[0]
        raise ValueError(
            f"target_modules matched {first!r} ({kinds[first].split(':', 1)[-1]}), which LoRA cannot adapt; "
            f"supported layers: {SUPPORTED_TYPES_TEXT}. Narrow target_modules or list it in exclude_modules."
        )
    _warn_unused_patterns(config, matched)
    return {
        name: TargetPlan(
            r=int(pattern_value(config.rank_pattern, name, config.r)),
            alpha=float(pattern_value(config.alpha_pattern, name, config.lora_alpha)),
            use_rslora=config.use_rslora,
        )
        for name in matched
    }


def _warn_unused_patterns(config: LoraConfig, matched: list[str]) -> None:
    for label, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in pattern:
            if not any(re.match(rf"(.*\.)?({key})$", n) for n in matched):
                warnings.warn(
                    f"{label} key {key!r} matches none of the adapted modules ({_sample(matched)}); "
                    "it has no effect.",
                    stacklevel=4,
                )


def is_internal_name(name: str) -> bool:
    """True for modules inside lorakit's own wrappers (`q_proj.lora_A.default`, `base_layer`, ...)."""
    return any(part in INTERNAL_PARTS for part in name.split("."))


def _leaf_names(kinds: dict[str, str], wanted: Iterable[str]) -> list[str]:
    wanted = set(wanted)
    return sorted({n.split(".")[-1] for n, k in kinds.items() if k in wanted and n})


def _no_match_message(targets: set[str] | str, names: list[str], field_name: str) -> str:
    leaves = sorted({n.split(".")[-1] for n in names})
    hints: list[str] = []
    for target in [targets] if isinstance(targets, str) else sorted(targets):
        hints += difflib.get_close_matches(target.split(".")[-1], leaves, n=2, cutoff=0.6)
    hint = f" did you mean {', '.join(repr(h) for h in dict.fromkeys(hints))}?" if hints else ""
    return (
        f"{field_name}={_show(targets)} matched no module of the model;{hint} "
        f"(adaptable modules: {_sample(leaves)})"
    )


def _show(value: set[str] | str) -> str:
    return repr(value) if isinstance(value, str) else repr(sorted(value))


def _sample(items: list[str], limit: int = 12) -> str:
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
