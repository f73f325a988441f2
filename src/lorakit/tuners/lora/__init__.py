"""LoRA and its variants: the config (`config.py`), the layers (`layer.py`: Linear, Embedding, Conv;
`dora.py`; `quantized.py` for bitsandbytes and NF4 bases), which layer wraps a module
(`dispatch.py`) and weighted combinations of adapters (`weighted.py`)."""
