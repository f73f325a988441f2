"""The attribute names of adapter parameters and modules: the one list every module reads
(layers, targeting, the CLI's `info`, the LoRA+ optimizer). They are also the in-memory parameter
names and, through them, the file keys PEFT uses. Imports nothing from lorakit."""

# containers of a LoRA layer's trainable per-adapter tensors (keyed by adapter name)
LORA_PARAMETERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
# containers of a bottleneck adapter's trainable per-adapter tensors
BOTTLENECK_PARAMETERS = ("adapter_down", "adapter_up", "adapter_layer_norm", "adapter_scale")
# per-adapter modules without trained weights
ADAPTER_MODULES = ("lora_dropout", "adapter_dropout", "adapter_act")
# what a wrapper calls the module it wraps
WRAPPED = ("base_layer", "modules_to_save", "original_module")
# the "B side" LoRA+ trains at ratio x the learning rate: the up-projections (and DoRA's magnitude)
LORAPLUS_B_SIDE = ("lora_B", "lora_magnitude_vector", "adapter_up")
# every name component that belongs to lorakit's wrappers, never a target of its own
INTERNAL_PARTS = frozenset(LORA_PARAMETERS + BOTTLENECK_PARAMETERS + ADAPTER_MODULES + WRAPPED)
