"""Training helpers built on transformers: the LoRA+ Trainer."""

from .trainer import LoraPlusTrainer, LoraPlusTrainingArguments

__all__ = ["LoraPlusTrainer", "LoraPlusTrainingArguments"]
