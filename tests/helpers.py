"""Helpers the tests share: tiny seeded models, random adapter weights, model-state snapshots and
a `lorakit train` recipe. Fixtures live in `conftest.py`."""

import socket
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout: src/, benchmarks/, examples/


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32 and a 100-token vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return LlamaForCausalLM(config).eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every trainable tensor random values (B starts at zero, which would hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def state_snapshot(model: torch.nn.Module) -> dict:
    """Names, shapes and values of every parameter and buffer, plus the module tree's repr."""
    return {
        "tree": repr(model),
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["tree"] == before["tree"]
    assert after["grad"] == before["grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.allclose(value, after["tensors"][key], rtol=0, atol=0, equal_nan=True), key


def tiny_bert_recipe(**overrides) -> dict:
    """A `lorakit train` recipe: 16 shipped intent sentences, a 2-layer BERT built from a config, no
    dropout, plain SGD at a large constant lr (so runs compare exactly and visibly train)."""
    from lorakit.training.recipe import shipped_recipes

    data = shipped_recipes()["quickstart"].parent / "data" / "intents" / "train.jsonl"
    recipe = {
        "task": "classification",
        "model_config": {
            "model_type": "bert",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": 64,
        },
        "tokenizer_name_or_path": "all-MiniLM-L6-v2",
        "train_file": str(data),
        "max_train_samples": 16,
        "max_length": 24,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": ["query", "value"],
        "optim": "sgd",
        "learning_rate": 2.0,
        "lr_scheduler_type": "constant",
        "max_steps": 6,
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
    }
    recipe.update(overrides)
    return recipe


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a torchrun rendezvous (a fixed port may be taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
