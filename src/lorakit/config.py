"""Adapter configurations with PEFT's field names, defaults and JSON layout.

A config says *what* to adapt; it is validated once, at construction, so a contradiction is
reported where the user wrote it. It knows nothing of models or files beyond its own JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

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

# peft_type -> config class; each adapter family registers its own (tuners/*/config.py)
CONFIG_CLASSES: dict[str, type[PeftConfig]] = {}


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
