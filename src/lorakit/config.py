"""Adapter configurations with PEFT's field names, defaults and JSON layout.

A config says *what* to adapt; it is validated once, at construction, so a contradiction is
reported where the user wrote it. It knows nothing of models or files beyond its own JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from .files import CONFIG_NAME, atomic_write_text, committed_files, finish_interrupted_save

# The PEFT release whose file format lorakit reads and writes; stored as `peft_version` so PEFT
# reads our files as its own.
PEFT_FORMAT_VERSION = "0.21.2"


class PeftType(str, enum.Enum):
    """Adapter families. Values are the `peft_type` strings stored in `adapter_config.json`."""

    LORA = "LORA"
    BOTTLENECK = "BOTTLENECK"


class TaskType(str, enum.Enum):
    """PEFT's task types; they pick the `PeftModel` subclass and task-specific defaults."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


@dataclass
class LoftQConfig:
    """LoftQ settings for `init_lora_weights="loftq"` (Li et al., 2023, arXiv:2310.08659).

    Args:
        loftq_bits: bits of the quantized base weight (PEFT's default 8).
        loftq_iter: alternating quantize / low-rank-fit iterations.
    """

    loftq_bits: int = 8
    loftq_iter: int = 1


@dataclass
class PeftConfig:
    """Fields every adapter config shares, as PEFT stores them.

    Args:
        task_type: one of `TaskType` or None (generic model).
        base_model_name_or_path: recorded on wrap from the model's `name_or_path`.
        revision: the base model's revision, recorded for the user; never used to download.
        inference_mode: adapters are frozen when True (files are always saved with True).
    """

    task_type: str | None = None
    peft_type: str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        valid = [t.value for t in TaskType]
        if self.task_type is not None and self.task_type not in valid:
            raise ValueError(f"task_type={self.task_type!r} is not a task type; use one of {valid} or None.")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(
                    f"{f.name}={value!r} must be True or False (JSON true/false), not {type(value).__name__}."
                )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict PEFT writes: every field, sets as sorted lists, enums as strings."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in _NOT_SAVED:
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` into `save_directory` atomically."""
        os.makedirs(save_directory, exist_ok=True)
        finish_interrupted_save(str(save_directory))  # or a pending config would shadow this one
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())

    def to_json_string(self) -> str:
        """`adapter_config.json`'s text: saved adapters are always marked for inference, and
        `peft_version` names the PEFT format they follow."""
        data = self.to_dict()
        data["inference_mode"] = True
        data["peft_version"] = PEFT_FORMAT_VERSION
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the right config class from a dict read from `adapter_config.json`."""
        peft_type = data.get("peft_type")
        config_cls = CONFIG_CLASSES.get(peft_type) if cls is PeftConfig else cls
        if config_cls is None:
            raise ValueError(
                f"adapter_config.json has peft_type={peft_type!r}; lorakit reads {sorted(CONFIG_CLASSES)}."
            )
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"adapter_config.json keys {unknown} are unknown to lorakit (a newer PEFT?) and were dropped; "
                "check that the adapter does not depend on them.",
                stacklevel=2,
            )
        return config_cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None) -> PeftConfig:
        """Read `adapter_config.json` from a local folder (PEFT's layout)."""
        folder = os.path.join(path, subfolder) if subfolder else str(path)
        file = committed_files(folder)[0]  # the pending config, after a save killed past its commit
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {folder!r}. Pass the folder that save_pretrained wrote "
                "(lorakit loads local folders; download hub adapters first, e.g. with "
                "huggingface_hub.snapshot_download)."
            )
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{file} is not valid JSON in UTF-8 ({err}); the adapter folder is corrupted. "
                "Save the adapter again, or restore the file from where it came."
            ) from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{file} holds JSON {json.dumps(data)[:40]}, not an object of config fields "
                '({"peft_type": "LORA", "r": 8, ...}); the adapter folder is corrupted.'
            )
        return cls.from_dict(data)


_NOT_SAVED = {"runtime_config"}

# Heads trained in full for classification tasks, added to modules_to_save as PEFT does; only
# those present in the model are used.
TASK_HEAD_MODULES: dict[str, tuple[str, ...]] = {
    TaskType.SEQ_CLS.value: ("classifier", "score"),
    TaskType.TOKEN_CLS.value: ("classifier", "score"),
    TaskType.QUESTION_ANS.value: ("qa_outputs",),
}

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


CONFIG_CLASSES: dict[str, type[PeftConfig]] = {PeftType.LORA.value: LoraConfig}


def bias_mode(config: PeftConfig) -> str:
    """The config's LoRA `bias` mode; other adapter families train no base bias ("none")."""
    return getattr(config, "bias", "none")


def as_set_or_str(value: Any, name: str) -> set[str] | str | None:
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{name}={value!r} is not a valid regular expression: {err}.") from None
        return value
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be a list of module names or a regex string.") from None
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"{name}={value!r} must contain module names (strings).")
    return set(items)


def check_layer_selection(
    target_modules: set[str] | str | None,
    layers_to_transform: list[int] | int | None,
    layers_pattern: list[str] | str | None,
) -> None:
    """PEFT's rules for restricting targets to layer indices (shared by every adapter config)."""
    if isinstance(target_modules, str) and layers_to_transform is not None:
        raise ValueError(
            "layers_to_transform cannot be used with a regex target_modules string; put the layer "
            "indices in the regex, or pass target_modules as a list of names."
        )
    if isinstance(target_modules, str) and layers_pattern is not None:
        raise ValueError("layers_pattern cannot be used with a regex target_modules string.")
    if layers_pattern is not None and layers_to_transform is None:
        raise ValueError("layers_pattern only has an effect with layers_to_transform; set both or neither.")
    _check_layer_indices(layers_to_transform)


def _check_layer_indices(layers: Any) -> None:
    if layers is None:
        return
    values = [layers] if isinstance(layers, int) else layers
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"layers_to_transform={layers!r} must be a non-negative int or a list of them.")


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
