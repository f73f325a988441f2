"""Shared by the quantized-base tests: one tiny Llama saved to disk and reloaded through
transformers' BitsAndBytesConfig, as a user loads a 4-bit/8-bit base."""

import warnings

import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
# bnb's CPU 4-bit kernels need in_features >= the 64-value block, so the model is 64 wide
CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def load_quantized(path: str, kind: str, dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """The model in `path` loaded with bitsandbytes quantization `kind` (a key of `QUANT`) on CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(**QUANT[kind]), device_map="cpu", dtype=dtype
        )


def train_losses(model, batch, steps: int = 4, lr: float = 1e-2) -> list[float]:
    """Losses of `steps` AdamW steps over the trainable parameters, each on `batch()` as inputs and labels."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    losses = []
    for _ in range(steps):
        inputs = batch()
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
