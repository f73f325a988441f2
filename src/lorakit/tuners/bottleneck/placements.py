"""Where bottleneck adapters go in each model family: the module names of the presets (series after
attention and FFN, parallel beside the FFN) for BERT, Llama, GPT-2 and T5."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """Module names (LoRA's list rules) of one architecture's sublayers.

    attention_output / ffn_output: the output projections the series adapters follow.
    ffn_block: the module computing the feed-forward block from its input (parallel adapters).
        BERT has none (its FFN is split over `intermediate` and `output`), so its parallel adapter
        sits beside the FFN's output projection, whose input is the 4d-wide intermediate activation.
    ffn_exclude: names that `ffn_output`'s suffix also matches but are not the feed-forward.
    layer_norms: the blocks' own layer norms (`train_layer_norms=True`).
    """

    attention_output: tuple[str, ...]
    ffn_output: tuple[str, ...]
    ffn_block: tuple[str, ...]
    ffn_exclude: tuple[str, ...] = ()
    layer_norms: tuple[str, ...] = ()


PLACEMENTS: dict[str, Placement] = {
    "bert": Placement(
        attention_output=("attention.output.dense",),
        ffn_output=("output.dense",),
        ffn_block=("output.dense",),
        ffn_exclude=("attention.output.dense",),
        layer_norms=("attention.output.LayerNorm", "output.LayerNorm"),
    ),
    "llama": Placement(
        attention_output=("self_attn.o_proj",),
        ffn_output=("mlp.down_proj",),
        ffn_block=("mlp",),
        layer_norms=("input_layernorm", "post_attention_layernorm"),
    ),
    "gpt2": Placement(
        attention_output=("attn.c_proj",),
        ffn_output=("mlp.c_proj",),
        ffn_block=("mlp",),
        layer_norms=("ln_1", "ln_2"),
    ),
    "t5": Placement(
        attention_output=("SelfAttention.o", "EncDecAttention.o"),
        ffn_output=("DenseReluDense.wo",),
        ffn_block=("DenseReluDense",),
        layer_norms=("layer_norm",),
    ),
}
# model types sharing a family's module names
_MODEL_FAMILY = {
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "mt5": "t5",
}
_PRESET_ALIASES = {"double_seq_bn": "houlsby", "seq_bn": "pfeiffer", "par_bn": "parallel"}


def _known_model_types() -> set[str]:
    return set(PLACEMENTS) | set(_MODEL_FAMILY)
