"""`LoraPlusTrainer`: transformers' `Trainer` with LoRA+ learning rates and adapter-only checkpoints.

As in the LoRA+ paper's reference trainer, only `create_optimizer` changes the optimisation; the
adapter-only checkpoints, resume and label names come from `lorakit.integrations.Trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..integrations import STAGING_FOLDER, Trainer
from ..optimizers import create_loraplus_optimizer

__all__ = ["STAGING_FOLDER", "LoraPlusTrainer", "LoraPlusTrainingArguments"]


@dataclass
class LoraPlusTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the two LoRA+ settings (so recipes can carry them)."""

    loraplus_lr_ratio: float | None = field(default=None, metadata={"help": "lr(B) / lr(A); LoRA+ uses 16."})
    loraplus_lr_embedding: float | None = field(default=None, metadata={"help": "lr of embedding adapters."})


class LoraPlusTrainer(Trainer):
    """A `lorakit.integrations.Trainer` whose optimizer gives B `loraplus_lr_ratio` times A's learning rate.

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


def _first(*values):
    return next(v for v in values if v is not None)
