"""LoRA and its variants: the config (`config.py`), the layers (`layer.py`: Linear, Embedding, Conv;
`dora.py`; `quantized.py` for bitsandbytes and NF4 bases), which layer wraps a module
(`dispatch.py`), the injection (`inject.py`) and weighted combinations (`weighted.py`).

Only the configs are re-exported (`from lorakit.tuners.lora import LoraConfig`, as from
`peft.tuners.lora`): the layers import `targeting`, which imports the config, so re-exporting them
here would make importing the config load the layers first."""

from .config import LoftQConfig, LoraConfig

__all__ = ["LoftQConfig", "LoraConfig"]
