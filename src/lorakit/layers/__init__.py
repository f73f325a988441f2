"""Adapted layers: the shared base, the LoRA layer types and the bottleneck layer."""

from .base import AdapterLayer, ModulesToSaveWrapper
from .bottleneck import BottleneckLayer
from .lora import Conv, Embedding, Linear, LoraLayer

__all__ = [
    "AdapterLayer",
    "BottleneckLayer",
    "Conv",
    "Embedding",
    "Linear",
    "LoraLayer",
    "ModulesToSaveWrapper",
]
