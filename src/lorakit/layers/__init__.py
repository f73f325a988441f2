"""Adapted layers: the shared base and the LoRA layer types."""

from .base import AdapterLayer, ModulesToSaveWrapper
from .lora import Conv, Embedding, Linear, LoraLayer

__all__ = ["AdapterLayer", "Conv", "Embedding", "Linear", "LoraLayer", "ModulesToSaveWrapper"]
