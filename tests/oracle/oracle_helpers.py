"""Shared helpers for the PEFT-oracle tests: tiny seed-built models, configs, outputs, saved files.

Every model here is built from a config (no downloads). A base model is built once per
architecture and deep-copied for each library, so lorakit and PEFT start from the same weights.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import lorakit  # noqa: F401  (re-exported to the tests)

ATOL = 1e-5
RTOL = 1e-5

# adapter_config.json keys whose values must agree with PEFT's; list-valued ones compare as sets
CONFIG_VALUE_KEYS = [
    "r",
    "lora_alpha",
    "target_modules",
    "peft_type",
    "task_type",
    "bias",
    "use_rslora",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "exclude_modules",
    "lora_bias",
]
SET_VALUED_CONFIG_KEYS = {"target_modules", "modules_to_save", "exclude_modules"}


class TinyConvNet(nn.Module):
    """Plain nn.Module with Conv1d/2d/3d and Linear layers (PEFT's generic PeftModel path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 8, kernel_size=3)
        self.conv2d = nn.Conv2d(3, 8, kernel_size=3)
        self.conv3d = nn.Conv3d(3, 8, kernel_size=3)
        self.fc = nn.Linear(24, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        feats = torch.cat(
            [
                self.conv1d(x1).mean(dim=-1),
                self.conv2d(x2).mean(dim=(-2, -1)),
                self.conv3d(x3).mean(dim=(-3, -2, -1)),
            ],
            dim=-1,
        )
        return self.head(torch.relu(self.fc(feats)))


def _build_llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
        attention_bias=True,  # so that bias="all" and bias="lora_only" differ
    )
    return transformers.LlamaForCausalLM(cfg)


def _build_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(cfg)


def _build_bert() -> nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


def _build_t5() -> nn.Module:
    cfg = transformers.T5Config(
        d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=100
    )
    return transformers.T5ForConditionalGeneration(cfg)


_BUILDERS = {
    "llama": _build_llama,
    "gpt2": _build_gpt2,
    "bert": _build_bert,
    "t5": _build_t5,
    "conv": TinyConvNet,
}

TASK_TYPES = {
    "llama": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "bert": "SEQ_CLS",
    "t5": "SEQ_2_SEQ_LM",
    "conv": None,
}

# per-architecture LoRA settings used by the architecture matrix
ARCH_LORA_KWARGS = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "gpt2": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    "bert": dict(r=4, lora_alpha=16, target_modules=["query", "value", "intermediate.dense"]),
    "t5": dict(r=4, lora_alpha=8, target_modules=["q", "k", "v", "o"]),
    "conv": dict(
        r=4, lora_alpha=8, target_modules=["conv1d", "conv2d", "conv3d", "fc"], modules_to_save=["head"]
    ),
}
ARCHS = list(_BUILDERS)


@functools.cache
def _base_model_cached(arch: str) -> nn.Module:
    torch.manual_seed(1234)
    return _BUILDERS[arch]().eval()


def base_model(arch: str) -> nn.Module:
    """A fresh copy of the seed-built base model of `arch` (same weights on every call)."""
    return copy.deepcopy(_base_model_cached(arch)).eval()


def model_inputs(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    if arch == "conv":
        return {
            "x1": torch.randn(2, 3, 12, generator=g),
            "x2": torch.randn(2, 3, 8, 8, generator=g),
            "x3": torch.randn(2, 3, 5, 5, 5, generator=g),
        }
    ids = torch.randint(0, 100, (2, 7), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(0, 100, (2, 5), generator=g)
    return inputs


def lora_config(lib, task_type: str | None = None, **kwargs):
    """`lib.LoraConfig(**kwargs)` with `task_type` given as that library's TaskType member."""
    if task_type is not None:
        kwargs["task_type"] = getattr(lib.TaskType, task_type)
    return lib.LoraConfig(**copy.deepcopy(kwargs))


def wrap(lib, arch: str, **kwargs):
    """`lib.get_peft_model` on a fresh copy of the base model of `arch`."""
    config = lora_config(lib, TASK_TYPES[arch], **kwargs)
    return lib.get_peft_model(base_model(arch), config).eval()


def load(lib, arch: str, directory: str, adapter_name: str = "default", is_trainable: bool = False):
    model = lib.PeftModel.from_pretrained(
        base_model(arch), directory, adapter_name=adapter_name, is_trainable=is_trainable
    )
    return model.eval()


def perturb_adapters(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Make adapters non-trivial: add seeded noise to every LoRA / modules_to_save / trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad or "lora_" in name or ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=g) * scale)


@torch.no_grad()
def outputs(model: nn.Module, arch: str) -> torch.Tensor:
    out = model(**model_inputs(arch))
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_same_outputs(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def assert_outputs_differ(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Guard against vacuous comparisons: the adapter must actually change the output."""
    assert (a - b).abs().max().item() > 1e-3, f"{what}: outputs are (nearly) identical"


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def targeted_module_names(model: nn.Module) -> set[str]:
    """Module paths (relative to the base model) that carry a LoRA adapter, read off parameter names."""
    names = set()
    for name, _ in model.named_parameters():
        for marker in (".lora_A.", ".lora_embedding_A."):
            if marker in name:
                names.add(name.split(marker)[0].removeprefix("base_model.model."))
    return names


def saved_tensors(directory: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def saved_shapes(directory: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in saved_tensors(directory).items()}


def saved_config(directory: str) -> dict:
    with open(os.path.join(directory, "adapter_config.json")) as f:
        return json.load(f)


def normalized_config_values(config: dict) -> dict:
    values = {}
    for key in CONFIG_VALUE_KEYS:
        value = config.get(key, "<missing>")
        if key in SET_VALUED_CONFIG_KEYS and isinstance(value, list):
            value = set(value)
        values[key] = value
    return values


def adapter_files(directory: str) -> set[str]:
    """Relative paths of the adapter files (config + weights) under `directory`."""
    found = set()
    for root, _, files in os.walk(directory):
        for f in files:
            if f in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
                found.add(os.path.relpath(os.path.join(root, f), directory))
    return found
