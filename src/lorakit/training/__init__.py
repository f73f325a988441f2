"""Training helpers built on transformers: the LoRA+ Trainer and `train`, the recipe runner behind
the `lorakit train` command."""

from .run import train
from .trainer import LoraPlusTrainer, LoraPlusTrainingArguments

__all__ = ["LoraPlusTrainer", "LoraPlusTrainingArguments", "train"]
