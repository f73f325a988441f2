"""lorakit's kernels: the compute of every adapted layer (`ops.py`), the fused LoRA autograd Function
(`linear.py`), sibling projections grouped into one matmul (`grouped.py`) and layer inputs rebuilt
in backward (`replay.py`). This module only re-exports their public names.
"""

from .grouped import forget_groups, sibling_hidden
from .linear import (
    LoraLinearFunction,
    drop_probability,
    fusable,
    masks_shared,
    share_dropout_masks,
    use_fused_kernels,
)
from .ops import (
    add_dora_conv,
    add_dora_embedding,
    add_dora_linear,
    add_lora_conv,
    add_lora_embedding,
    add_lora_linear,
    add_lora_linear_,
    linear_with_adapter,
)

__all__ = [
    "LoraLinearFunction",
    "add_dora_conv",
    "add_dora_embedding",
    "add_dora_linear",
    "add_lora_conv",
    "add_lora_embedding",
    "add_lora_linear",
    "add_lora_linear_",
    "drop_probability",
    "forget_groups",
    "fusable",
    "linear_with_adapter",
    "masks_shared",
    "share_dropout_masks",
    "sibling_hidden",
    "use_fused_kernels",
]
