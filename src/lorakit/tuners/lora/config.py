"""LoraConfig and LoftQConfig: LoRA's fields (PEFT's names and defaults) and their validation."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ...config import CONFIG_CLASSES, PeftConfig, PeftType, as_set_or_str, check_layer_selection


@dataclass
class LoftQConfig:
    """LoftQ settings for `init_lora_weights="loftq"` (Li et al., 2023, arXiv:2310.08659).

    Args:
        loftq_bits: bits of the quantized base weight (PEFT's default 8).
        loftq_iter: alternating quantize / low-rank-fit iterations.
    """

    loftq_bits: int = 8
    loftq_iter: int = 1


_KNOWN_INITS = ("gaussian", "pissa", "olora", "loftq", "eva", "corda", "orthogonal", "lora_ga")
# init strategies lorakit implements today; the others are accepted for file compatibility
_BUILT_INITS = (True, False, "gaussian", "pissa", "olora", "loftq")


def is_data_driven_init(init: bool | str) -> bool:
    """Whether `init_lora_weights` computes the factors from the base weight and replaces that weight
    (PiSSA, its fast-SVD form, OLoRA, LoftQ): the one test every module asks."""
    return isinstance(init, str) and (init in ("pissa", "olora", "loftq") or init.startswith("pissa_niter_"))


# PEFT fields lorakit stores but whose behaviour is not built yet: field -> the value meaning "off".
_UNBUILT_FIELDS: dict[str, Any] = {
    "megatron_config": None,
    "trainable_token_indices": None,
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}


@dataclass
class LoraConfig(PeftConfig):
    """LoRA: `W x + scaling * B(A(dropout(x)))` on the chosen modules (Hu et al., 2021).

    Field names and defaults are PEFT's, so a PEFT script and PEFT's `adapter_config.json` work
    unchanged. The most used ones:

    Args:
        r: adapter rank (> 0).
        lora_alpha: scale numerator; `scaling = lora_alpha / r`, or `lora_alpha / sqrt(r)` with
            `use_rslora` (Kalajdzievski, 2023).
        lora_dropout: dropout probability on the adapter's input, in [0, 1).
        target_modules: list (exact name or `.`-suffix match), str (`re.fullmatch` on the full
            module name), `"all-linear"` (every Linear/Conv1D but the output head), or None
            (a per-architecture default).
        exclude_modules: same forms as `target_modules`; matching modules are skipped.
        fan_in_fan_out: the base weight is stored (in, out), as in GPT-2's Conv1D.
        bias: "none", "all" (every bias trains) or "lora_only" (biases of adapted modules train).
        modules_to_save: modules trained in full and saved beside the adapter.
        init_lora_weights: True (Kaiming-uniform A, zero B), False (random A and B), "gaussian"
            (A ~ N(0, std=1/r), zero B).
        layers_to_transform / layers_pattern: restrict targets to these layer indices.
        rank_pattern / alpha_pattern: per-module r / alpha; keys are regexes matched at a dot
            boundary against the module name.
        lora_bias: give B a trainable bias (zero at start).
    """

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list | dict | None = None
    loftq_config: dict | LoftQConfig = field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    use_dora: bool = False
    velora_config: dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = None
    layer_replication: list[list[int]] | None = None
    runtime_config: dict | None = field(default_factory=dict)
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LORA.value
        self.target_modules = as_set_or_str(self.target_modules, "target_modules")
        self.exclude_modules = as_set_or_str(self.exclude_modules, "exclude_modules")
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r}: the LoRA rank must be a positive integer, e.g. r=8.")
        _check_alpha(self.lora_alpha, "lora_alpha")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout={dropout!r} must be a number in [0, 1), e.g. lora_dropout=0.05.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={self.bias!r} is not a bias mode; use 'none', 'all' or 'lora_only'.")
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern)
        _check_pattern(self.rank_pattern, "rank_pattern", need_int=True)
        _check_pattern(self.alpha_pattern, "alpha_pattern", need_int=False)
        init = self.init_lora_weights
        if not isinstance(init, bool) and not (
            isinstance(init, str) and (init in _KNOWN_INITS or re.fullmatch(r"pissa_niter_\d+", init))
        ):
            raise ValueError(
                f"init_lora_weights={init!r} is not an init strategy; use True, False, 'gaussian', 'pissa', "
                "'pissa_niter_<n>', 'olora' or 'loftq'."
            )
        if init == "loftq" and not self.loftq_config:
            raise ValueError("init_lora_weights='loftq' needs loftq_config=LoftQConfig(...).")
        if self.loftq_config and init != "loftq":
            raise ValueError("loftq_config is set but init_lora_weights is not 'loftq'; set both or neither.")
        if self.loftq_config:
            bits, iters = self.loftq_config.get("loftq_bits", 8), self.loftq_config.get("loftq_iter", 1)
            if not (isinstance(bits, int) and 2 <= bits <= 8) or not (isinstance(iters, int) and iters >= 1):
                raise ValueError(
                    f"loftq_config={self.loftq_config}: loftq_bits must be an int in 2..8 and loftq_iter >= 1."
                )
        if self.use_dora and self.lora_bias:
            raise ValueError("use_dora=True and lora_bias=True cannot be combined; pick one.")

    def check_supported(self) -> None:
        """Raise `NotImplementedError` naming any stored option whose behaviour is not built yet."""
        for name, off in _UNBUILT_FIELDS.items():
            value = getattr(self, name)
            if value != off and not (off is None and value in ({}, [])):
                raise NotImplementedError(
                    f"LoraConfig.{name}={value!r} is not implemented in lorakit yet; "
                    f"remove it (or set {name}={off!r}) to use this adapter."
                )
        init = self.init_lora_weights
        if init not in _BUILT_INITS and not (isinstance(init, str) and init.startswith("pissa_niter_")):
            raise NotImplementedError(
                f"init_lora_weights={self.init_lora_weights!r} is not implemented in lorakit yet; "
                "use True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' or 'loftq'."
            )
        runtime = self.runtime_config or {}
        if isinstance(runtime, dict) and runtime.get("ephemeral_gpu_offload"):
            raise NotImplementedError("runtime_config.ephemeral_gpu_offload is not implemented in lorakit.")


CONFIG_CLASSES[PeftType.LORA.value] = LoraConfig


def _check_alpha(value: Any, name: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0 (the scale is alpha / r), e.g. 16.")


def _check_pattern(pattern: Any, name: str, need_int: bool) -> None:
    if not isinstance(pattern, dict):
        raise ValueError(f"{name}={pattern!r} must be a dict mapping module-name regexes to values.")
    for key, value in pattern.items():
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"{name} key {key!r} is not a valid regular expression: {err}.") from None
        if need_int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name}[{key!r}]={value!r}: ranks must be positive integers.")
        if not need_int:
            _check_alpha(value, f"{name}[{key!r}]")
