"""Series and parallel bottleneck adapters: the config and its presets (`config.py`,
`placements.py`), the layer (`layer.py`) and where the adapters are put (`inject.py`)."""
