"""`lorakit train`: a recipe in, a trained adapter (PEFT format), `metrics.jsonl` and a loss curve out.

Everything a recipe names is loaded and checked (files, columns, model, targets) before the first
step. Training itself is the transformers `Trainer` (as `LoraPlusTrainer` or `DpoTrainer`), so
`torchrun` / `accelerate launch` bring DDP, FSDP or DeepSpeed without code of ours.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PrinterCallback,
    ProgressCallback,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from ..config import TaskType
from ..files import atomic_write_text, save_folder_atomically
from ..peft_model import get_peft_model
from ..tuners.bottleneck.config import BottleneckConfig
from ..tuners.lora.config import LoraConfig
from . import data as D
from .callbacks import MetricsLog, ProgressBar, plot_loss, read_metrics
from .dpo import DpoTrainer
from .evaluate import evaluate
from .recipe import Recipe, RecipeError, load_recipe
from .trainer import LoraPlusTrainer, LoraPlusTrainingArguments

RECIPE_FILE = "lorakit_recipe.yaml"  # the resolved recipe, saved beside the adapter (read by `lorakit merge`)
BASE_MODEL_FOLDER = (
    "base_model"  # where a model built from `model_config` is saved, so the adapter has a base
)


@dataclass
class TrainResult:
    """What a run produced: where, how big, how long, and the held-out metrics before and after."""

    output_dir: str
    task: str
    trainable_params: int
    all_params: int
    steps: int
    seconds: float
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    resumed_from: str | None = None
    loss_curve: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train(
    recipe: Recipe | str | os.PathLike | dict | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    train_dataset=None,
    eval_dataset=None,
) -> TrainResult:
    """Fine-tune per `recipe` and save the adapter to its `output_dir`.

    Args:
        recipe: a YAML path, a shipped recipe's name, a mapping, a `Recipe`, or None (quickstart).
        overrides: recipe keys to replace (the command line's `--key value`).
        resume: continue from the last complete checkpoint in `output_dir` (same seed: the result
            equals an uninterrupted run). Without it, an `output_dir` holding checkpoints is an error.
        train_dataset / eval_dataset: a `datasets.Dataset` (or any iterable of dicts) used instead
            of `train_file` / `eval_file`.

    Raises:
        RecipeError: anything wrong with the recipe, found before training starts.
    """
    started = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    keys = recipe.keys
    if not keys.use_peft:
        raise RecipeError("use_peft: false (full fine-tuning) is not what lorakit does; set use_peft: true.")
    args = _training_arguments(recipe)
    checkpoint = _checkpoint_to_resume(args, resume)
    set_seed(args.seed)

    tokenizer = load_tokenizer(recipe)
    train_rows = _rows(train_dataset, keys.train_file, "train_file", keys.max_train_samples)
    eval_rows = _rows(eval_dataset, keys.eval_file, "eval_file", keys.max_eval_samples, required=False)
    D.check_columns(keys, train_rows, "train data")  # before label_names reads the labels
    labels = D.label_names(train_rows, keys.label_column) if keys.task == "classification" else None
    train_examples = examples_for(recipe, tokenizer, train_rows, labels, "train data")
    eval_examples = examples_for(recipe, tokenizer, eval_rows, labels, "eval data") if eval_rows else []

    base = build_model(recipe, tokenizer, labels, args, resume=checkpoint is not None)
    model = _adapt(recipe, base, tokenizer, args, resume=checkpoint is not None)
    collate = collator_for(keys.task, tokenizer)
    trainer_cls = DpoTrainer if keys.task == "dpo" else LoraPlusTrainer
    extra = {"beta": keys.beta} if keys.task == "dpo" else {}
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=D.ListDataset(train_examples),
        eval_dataset=D.ListDataset(eval_examples) if eval_examples else None,
        data_collator=collate,
        processing_class=tokenizer,
        loraplus_lr_ratio=keys.loraplus_lr_ratio or 1.0,  # no ratio: plain LoRA (every group at lr)
        loraplus_lr_embedding=keys.loraplus_lr_embedding
        or (1e-6 if keys.loraplus_lr_ratio else args.learning_rate),
        **extra,
    )
    if keys.task == "classification":
        # transformers infers "the loss sums over num_items_in_batch" from the forward's **kwargs; a
        # classifier's loss is a mean, and scaling it as a sum would break accumulation and DDP.
        trainer.model_accepts_loss_kwargs = False
    _install_callbacks(trainer, args)
    main = trainer.is_world_process_zero()
    trainable, total = model.get_nb_trainable_parameters()
    if main:
        adapter = "bottleneck adapters" if keys.bottleneck is not None else f"LoRA r={keys.lora_r}"
        _say(
            f"{keys.task}: {_model_label(recipe)} with {adapter}; "
            f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
        )

    def measure() -> dict[str, float]:
        if not eval_examples:
            return {}
        return evaluate(model, keys.task, eval_examples, collate, args.per_device_eval_batch_size, keys.beta)

    before = measure()
    if main and before:
        _say("before training: " + _format(before))
    trainer.train(resume_from_checkpoint=checkpoint)
    after = measure()

    trainer.save_model(args.output_dir)
    result = TrainResult(
        output_dir=args.output_dir,
        task=keys.task,
        trainable_params=trainable,
        all_params=total,
        steps=trainer.state.global_step,
        seconds=time.perf_counter() - started,
        before=before,
        after=after,
        resumed_from=checkpoint,
    )
    if main:
        _write_outputs(recipe, labels, result)
        _print_summary(result)
    return result


# ---- pieces (also used by `lorakit merge` and the tests) -------------------------------------------
def load_tokenizer(recipe: Recipe):
    """The recipe's tokenizer, with a pad token (eos or sep when it has none) and a chat template."""
    keys = recipe.keys
    source = keys.tokenizer_name_or_path or keys.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise RecipeError(f"Cannot load a tokenizer from {source!r}: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    if keys.chat_template is not None:
        tokenizer.chat_template = keys.chat_template
    elif keys.task == "sft" and getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = D.DEFAULT_CHAT_TEMPLATE
    if keys.task != "classification" and tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def examples_for(
    recipe: Recipe, tokenizer, rows: list[dict], labels: list[str] | None, source: str
) -> list[dict]:
    """Tokenised examples of `rows` for the recipe's task (columns checked first)."""
    keys = recipe.keys
    D.check_columns(keys, rows, source)
    if keys.task == "classification":
        return D.classification_examples(rows, tokenizer, keys, labels, source)
    if keys.task == "sft":
        return D.sft_examples(rows, tokenizer, keys)
    return D.dpo_examples(rows, tokenizer, keys)


def collator_for(task: str, tokenizer):
    return (D.DpoCollator if task == "dpo" else D.PadCollator)(tokenizer.pad_token_id)


def build_model(
    recipe: Recipe, tokenizer, labels: list[str] | None, args=None, *, resume: bool = False
) -> torch.nn.Module:
    """The base model: pretrained (`model_name_or_path`) or built from `model_config` and seeded.

    With `args`, a model built from a config is named `<output_dir>/base_model`, so the adapter's
    `base_model_name_or_path` names a model that exists (`train` saves it there once the adapter
    fits it). With `resume`, the model is reloaded from that folder, after checking that it was
    built from this `model_config`: the checkpoints were trained on it.

    Raises:
        RecipeError: the model cannot be loaded, its config is invalid, or the `base_model` a
            resume would reload was built from another `model_config`.
    """
    keys = recipe.keys
    auto = AutoModelForSequenceClassification if keys.task == "classification" else AutoModelForCausalLM
    head = {}
    if labels is not None:
        head = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    dtype = getattr(torch, keys.torch_dtype) if keys.torch_dtype != "auto" else "auto"
    source = keys.model_name_or_path
    if keys.model_config is not None:
        settings = dict(keys.model_config)
        model_type = settings.pop("model_type")
        settings.setdefault("vocab_size", len(tokenizer))
        settings.setdefault("pad_token_id", tokenizer.pad_token_id)
        try:
            config = AutoConfig.for_model(model_type, **settings, **head)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"model_config is not a valid {model_type!r} config: {err}") from None
        saved = _saved_base(recipe, args, resume)
        if saved is None:
            model = auto.from_config(config)
            if args is not None:
                model.name_or_path = model.config._name_or_path = str(_base_folder(args).resolve())
            return model.to(dtype) if dtype != "auto" else model
        _check_saved_base(saved, config, ["model_type", *settings, *head])
        source = str(saved.resolve())
    try:
        return auto.from_pretrained(source, dtype=dtype, **head)
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"Cannot load model_name_or_path={source!r}: {err}\nGive a local model folder (config.json "
            "and weights), or a hub id on a machine that can download it."
        ) from None


def adapter_config(recipe: Recipe, model_type: str) -> LoraConfig | BottleneckConfig:
    """The recipe's adapter: `BottleneckConfig` when it has a `bottleneck` mapping, else LoRA."""
    keys = recipe.keys
    if keys.bottleneck is None:
        return lora_config(recipe)
    settings = dict(keys.bottleneck)
    preset = settings.pop("preset", None)
    settings.setdefault("task_type", _task_type(keys.task))
    try:
        if preset is not None:
            return BottleneckConfig.from_preset(preset, model_type, **settings)
        return BottleneckConfig(**settings)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"bottleneck: {err}") from None


def lora_config(recipe: Recipe) -> LoraConfig:
    """`LoraConfig` from the recipe's TRL-style keys (`lora_r`, `lora_alpha`, ...)."""
    keys = recipe.keys
    try:
        return LoraConfig(
            task_type=_task_type(keys.task),
            r=keys.lora_r,
            lora_alpha=keys.lora_alpha,
            lora_dropout=keys.lora_dropout,
            target_modules=keys.lora_target_modules,
            modules_to_save=keys.lora_modules_to_save,
            use_rslora=keys.use_rslora,
            use_dora=keys.use_dora,
            init_lora_weights=keys.init_lora_weights,
        )
    except (ValueError, TypeError) as err:
        raise RecipeError(f"LoRA keys: {err}") from None


# ---- helpers -------------------------------------------------------------------------------------
def _task_type(task: str) -> str:
    return TaskType.SEQ_CLS.value if task == "classification" else TaskType.CAUSAL_LM.value


def _training_arguments(recipe: Recipe) -> LoraPlusTrainingArguments:
    settings = dict(recipe.training)
    settings["loraplus_lr_ratio"] = recipe.keys.loraplus_lr_ratio
    settings["loraplus_lr_embedding"] = recipe.keys.loraplus_lr_embedding
    settings.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:
        # a DDP backend means nothing to one process, and accelerate fails on it there
        settings.pop("ddp_backend", None)
    if not torch.cuda.is_available() and (settings.get("bf16") or distributed):
        # transformers wants this said to autocast bf16 on the CPU, and to run DDP over gloo on CPUs
        settings.setdefault("use_cpu", True)
    try:
        return LoraPlusTrainingArguments(**settings)
    except (ValueError, TypeError, ImportError) as err:
        raise RecipeError(f"Training arguments: {err}") from None


def _base_folder(args) -> Path:
    return Path(args.output_dir) / BASE_MODEL_FOLDER


def _saved_base(recipe: Recipe, args, resume: bool) -> Path | None:
    """The `base_model` folder a resume reloads (None: build the model from `model_config`)."""
    if recipe.keys.model_config is None or args is None or not resume:
        return None
    folder = _base_folder(args)
    return folder if (folder / "config.json").is_file() else None


def _check_saved_base(saved: Path, config, names: list[str]) -> None:
    """Raise RecipeError naming every config value among `names` that `saved` was not built with."""
    built = AutoConfig.from_pretrained(saved)
    differ = [
        f"{name}: {getattr(built, name, None)!r} there, {getattr(config, name, None)!r} in the recipe"
        for name in names
        if getattr(built, name, None) != getattr(config, name, None)
    ]
    if differ:
        raise RecipeError(
            f"--resume: {saved} was built from another model_config ({'; '.join(differ)}), and the "
            "checkpoints were trained on it. Resume with the model_config it was built from, or train "
            "from scratch into another output_dir."
        )


def _adapt(recipe: Recipe, base, tokenizer, args, resume: bool):
    """`base` with the recipe's adapters; a base built from `model_config` is saved to
    `<output_dir>/base_model` only once the adapters fit it.

    The base is saved before the adapters go in (they change the model in place), into a staging
    folder that replaces `base_model` when `get_peft_model` succeeds and is removed when it fails:
    a failed run leaves no base behind, and a fresh run never keeps a stale one.
    """
    staging = None
    if _saved_base(recipe, args, resume) is None and recipe.keys.model_config is not None:
        if args.process_index == 0:  # the other ranks built the same seeded model
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{BASE_MODEL_FOLDER}-", dir=args.output_dir))
            save_folder_atomically(staging / BASE_MODEL_FOLDER, base, tokenizer)
    try:
        model = get_peft_model(base, adapter_config(recipe, base.config.model_type))
        if staging is not None:
            folder = _base_folder(args)
            if folder.exists():  # from an earlier run into this output_dir, which this one restarts
                os.replace(folder, staging / "replaced")
            os.replace(staging / BASE_MODEL_FOLDER, folder)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return model


def _checkpoint_to_resume(args, resume: bool) -> str | None:
    if args.resume_from_checkpoint:
        if not os.path.isdir(args.resume_from_checkpoint):
            raise RecipeError(f"resume_from_checkpoint={args.resume_from_checkpoint!r} does not exist.")
        return args.resume_from_checkpoint
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if resume:
        if last is None and args.process_index == 0:
            _say(f"no checkpoint in {args.output_dir}: starting from the beginning")
        return last
    if last is not None:
        raise RecipeError(
            f"{args.output_dir} already holds checkpoints (last: {os.path.basename(last)}). Pass --resume to "
            "continue from it, or set another output_dir."
        )
    return None


def _rows(dataset, path: str | None, key: str, limit: int | None, required: bool = True) -> list[dict]:
    if dataset is not None:
        rows = D.as_rows(dataset, f"the {key.split('_')[0]} dataset")
    elif path is not None:
        rows = D.read_rows(path)
    elif required:
        raise RecipeError(f"No training data: set {key} (a .jsonl, .json or .csv file).")
    else:
        return []
    return rows[:limit] if limit is not None else rows


def _install_callbacks(trainer, args) -> None:
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if not args.disable_tqdm:
        trainer.add_callback(ProgressBar())
    trainer.add_callback(MetricsLog(Path(args.output_dir) / "metrics.jsonl"))


def _write_outputs(recipe: Recipe, labels: list[str] | None, result: TrainResult) -> None:
    out = Path(result.output_dir)
    saved = recipe.to_dict()
    if labels is not None:
        saved["labels"] = labels
    # written through a temporary file and a rename: a crash leaves the old file or the new, never half
    atomic_write_text(str(out / RECIPE_FILE), yaml.safe_dump(saved, sort_keys=True))
    if plot_loss(
        read_metrics(out / "metrics.jsonl"), out / "loss.png", f"lorakit {recipe.name}: {result.task}"
    ):
        result.loss_curve = str(out / "loss.png")
    atomic_write_text(str(out / "summary.json"), json.dumps(result.to_dict(), indent=2) + "\n")


def _print_summary(result: TrainResult) -> None:
    lines = [
        f"done in {result.seconds:.1f} s, {result.steps} steps"
        + (f" (resumed from {os.path.basename(result.resumed_from)})" if result.resumed_from else ""),
        f"adapter: {result.output_dir}/adapter_model.safetensors (+ adapter_config.json)",
        f"trainable parameters: {result.trainable_params:,} of {result.all_params:,} "
        f"({100 * result.trainable_params / result.all_params:.2f}%)",
    ]
    for name in result.after:
        lines.append(f"{name}: {result.before[name]:.4f} -> {result.after[name]:.4f}")
    lines.append(
        f"metrics: {result.output_dir}/metrics.jsonl"
        + (f", loss curve: {result.loss_curve}" if result.loss_curve else "")
    )
    _say("\n  ".join(lines))


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _model_label(recipe: Recipe) -> str:
    keys = recipe.keys
    if keys.model_config is not None:
        return f"a {keys.model_config['model_type']} model built from model_config"
    return keys.model_name_or_path


def _say(message: str) -> None:
    print(f"lorakit: {message}", flush=True)


__all__ = ["TrainResult", "build_model", "load_tokenizer", "lora_config", "train"]
