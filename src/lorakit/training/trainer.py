"""`LoraPlusTrainer`: transformers' `Trainer` with LoRA+ learning rates and adapter-only checkpoints.

As in the LoRA+ paper's reference trainer, only `create_optimizer` changes the optimisation; the
checkpoint hooks write and read PEFT-format adapters, never the full base model.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import find_labels

try:  # transformers >= 5
    from transformers.trainer import rotate_checkpoints
except ImportError:  # pragma: no cover - older transformers rotate inside _save_checkpoint only
    rotate_checkpoints = None

from ..checkpoint import read_adapter_weights
from ..optimizers import create_loraplus_optimizer
from ..peft_model import PeftModel, set_peft_model_state_dict


@dataclass
class LoraPlusTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the two LoRA+ settings (so recipes can carry them)."""

    loraplus_lr_ratio: float | None = field(default=None, metadata={"help": "lr(B) / lr(A); LoRA+ uses 16."})
    loraplus_lr_embedding: float | None = field(default=None, metadata={"help": "lr of embedding adapters."})


class LoraPlusTrainer(Trainer):
    """A `transformers.Trainer` whose optimizer gives B `loraplus_lr_ratio` times A's learning rate.

    Args:
        loraplus_lr_ratio: default: the training arguments' value, else 16.
        loraplus_lr_embedding: default: the training arguments' value, else 1e-6.
        tokenizer: accepted as an alias of `processing_class` (older transformers scripts pass it).
    Other arguments are `Trainer`'s. Weight decay comes from `args.weight_decay` and never applies
    to biases and norms.
    """

    def __init__(
        self,
        *args,
        loraplus_lr_ratio: float | None = None,
        loraplus_lr_embedding: float | None = None,
        tokenizer=None,
        **kwargs,
    ) -> None:
        if tokenizer is not None:
            kwargs.setdefault("processing_class", tokenizer)
        super().__init__(*args, **kwargs)
        if isinstance(self.model, PeftModel) and self.args.label_names is None:
            # Trainer reads label names off the model class; ours wraps, so ask the base model's class
            self.label_names = find_labels(type(self.model.get_base_model()))
        self.loraplus_lr_ratio = _first(
            loraplus_lr_ratio, getattr(self.args, "loraplus_lr_ratio", None), 16.0
        )
        self.loraplus_lr_embedding = _first(
            loraplus_lr_embedding, getattr(self.args, "loraplus_lr_embedding", None), 1e-6
        )

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = model if model is not None else self.model
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs = dict(optimizer_kwargs)
            lr = optimizer_kwargs.pop("lr", self.args.learning_rate)
            optimizer_kwargs.pop("weight_decay", None)
            self.optimizer = create_loraplus_optimizer(
                opt_model,
                optimizer_cls,
                lr=lr,
                loraplus_lr_ratio=self.loraplus_lr_ratio,
                loraplus_lr_embedding=self.loraplus_lr_embedding,
                loraplus_weight_decay=self.args.weight_decay,
                **optimizer_kwargs,
            )
        return self.optimizer

    # ---- adapter-only checkpoints --------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if not isinstance(model, PeftModel):
            super()._save(output_dir, state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # every rank calls this (FSDP2 shards are gathered collectively); only the main one writes
        model.save_pretrained(output_dir, safe_serialization=True, is_main_process=self.args.should_save)
        if self.processing_class is not None and self.args.should_save:
            self.processing_class.save_pretrained(output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """Write `checkpoint-N` in a staging folder, then rename it into place.

        A crash mid-save leaves only the staging folder (which the next save clears), never a
        half-written `checkpoint-N` that a resume would pick up.
        """
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, STAGING_FOLDER)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging
        try:
            written = os.path.join(self._get_output_dir(trial=trial), name)
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            final = os.path.join(self._get_output_dir(trial=trial), name)
            if os.path.isdir(final):  # the same step saved by an earlier, interrupted run
                shutil.rmtree(final)
            os.replace(written, final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best is not None and best.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, staging))
            if rotate_checkpoints is not None:
                rotate_checkpoints(
                    output_dir=os.path.dirname(final),
                    save_total_limit=self.args.save_total_limit,
                    best_model_checkpoint=self.state.best_model_checkpoint,
                    use_mtime=False,
                )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        model = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        if not isinstance(model, PeftModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        for name in model.peft_config:
            folder = (
                resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            )
            if os.path.isdir(folder):
                set_peft_model_state_dict(model, read_adapter_weights(folder), adapter_name=name)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and isinstance(self.model, PeftModel):
            self._load_from_checkpoint(best)
        else:
            super()._load_best_model()


STAGING_FOLDER = ".checkpoint-in-progress"


def _first(*values):
    return next(v for v in values if v is not None)
