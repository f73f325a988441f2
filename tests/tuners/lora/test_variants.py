"""Init strategies on every layer type: step 0 keeps the model's function; LoftQ approximates it;
PiSSA/OLoRA adapters convert to plain LoRA on the original base; rsLoRA's scaling claim."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorakit import LoftQConfig, LoraConfig, PeftModel, get_peft_model
from lorakit.tuners.lora.layer import LoraLayer
from tests.helpers import tiny_llama

INITS = [True, "gaussian", "pissa", "pissa_niter_4", "olora"]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        hidden = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(hidden))


def models():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)).eval()
    ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    return {
        "llama": (tiny_llama(), ["q_proj", "v_proj", "embed_tokens"], {"input_ids": ids}),
        "gpt2": (gpt2, ["c_attn", "c_fc"], {"input_ids": ids}),
        "conv": (ConvNet().eval(), ["emb", "conv", "head"], {"ids": ids}),
    }


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("init", INITS, ids=str)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "conv"])
def test_init_leaves_the_model_function_unchanged_at_step_zero(arch, init, rslora):
    base, targets, inputs = models()[arch]
    expected = run(base, inputs)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=init, use_rslora=rslora)
    with pytest.warns() if arch == "gpt2" else _no_warning():
        model = get_peft_model(copy.deepcopy(base), config)
    torch.testing.assert_close(run(model, inputs), expected, atol=2e-5, rtol=1e-4)
    if init in ("pissa", "olora"):  # the adapter carries the principal part, the base the rest
        layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
        assert layer._delta_rows("default").abs().max() > 1e-3


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_loftq_gets_much_closer_to_full_precision_than_quantizing_alone():
    base = tiny_llama()
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    full = run(base, {"input_ids": ids})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(
        r=8,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_bits=2, loftq_iter=4),
    )
    model = get_peft_model(copy.deepcopy(base), config)
    with_adapter = run(model, {"input_ids": ids})
    with model.disable_adapter():
        quantized_only = run(model, {"input_ids": ids})
    error_adapter = (with_adapter - full).norm() / full.norm()
    error_quantized = (quantized_only - full).norm() / full.norm()
    # measured on this model (relative logit error): 2-bit NF alone 0.404, with the LoftQ adapter 0.162
    # (ratio 0.40); at 4 bits, 1 iteration: 0.057 -> 0.032 (0.56)
    assert error_adapter < 0.55 * error_quantized, (error_adapter.item(), error_quantized.item())


def test_loftq_works_on_embedding_and_conv_layers():
    base, _, inputs = models()["conv"]
    config = LoraConfig(
        r=2, target_modules=["emb", "conv"], init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4)
    )
    model = get_peft_model(copy.deepcopy(base), config)
    full, approx = run(base, inputs), run(model, inputs)
    with model.disable_adapter():
        quantized_only = run(model, inputs)
    assert (approx - full).norm() < (quantized_only - full).norm()
    assert model.base_model.model.emb.lora_embedding_B["default"].abs().sum() > 0


def train_a_little(model, inputs, steps=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        out = model(**inputs)
        out = out if isinstance(out, torch.Tensor) else out.logits
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("arch", ["llama", "conv"])
def test_converted_adapter_reproduces_the_trained_model_on_the_untouched_base(arch, init, rslora, tmp_path):
    base, targets, inputs = models()[arch]
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=targets,
        init_lora_weights=init,
        use_rslora=rslora,
        rank_pattern={targets[0]: 2},
        alpha_pattern={targets[0]: 4},
    )
    model = get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "initial")
    trained = run(train_a_little(model, inputs), inputs)
    model.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=tmp_path / "initial")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "final")
    saved = loaded.peft_config["default"]
    assert saved.r == 8 and saved.init_lora_weights is True and saved.rank_pattern == {targets[0]: 4}
    assert saved.lora_alpha == pytest.approx(16 * (math.sqrt(2) if rslora else 2))
    torch.testing.assert_close(run(loaded, inputs), trained, atol=1e-4, rtol=1e-4)


def test_conversion_refuses_loftq_and_mismatched_initial_folders(tmp_path):
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    )
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not fit this one"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "other")
    assert not (tmp_path / "out").exists()
    loftq = get_peft_model(
        tiny_llama(),
        LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=LoftQConfig()),
    )
    with pytest.raises(ValueError, match="LoftQ"):
        loftq.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "other")


def test_pissa_on_a_replicated_model_leaves_shared_weights_alone():
    base = tiny_llama(layers=4)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = run(base, {"input_ids": ids})
    config = LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights="pissa", layer_replication=[[0, 4], [2, 4]]
    )
    model = get_peft_model(copy.deepcopy(base), config)
    layers = model.base_model.model.model.layers
    assert layers[4].mlp.up_proj.weight is layers[2].mlp.up_proj.weight
    assert torch.isfinite(run(model, {"input_ids": ids})).all() and expected.shape[0] == 2


def test_rslora_keeps_the_learning_signal_stable_across_ranks():
    """rsLoRA (Kalajdzievski 2023): with alpha/r the step-0 gradient of B shrinks like 1/sqrt(r);
    with alpha/sqrt(r) it stays of the same order as r grows from 4 to 256."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512, intermediate_size=512, num_hidden_layers=1, num_attention_heads=8, vocab_size=64
    )
    base = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    norms = {}
    for rslora in (False, True):
        for r in (4, 16, 64, 256):
            torch.manual_seed(2)
            model = get_peft_model(
                copy.deepcopy(base),
                LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=rslora),
            )
            model(input_ids=ids, labels=ids).loss.backward()
            grads = [p.grad.norm() ** 2 for n, p in model.named_parameters() if "lora_B" in n]
            norms[rslora, r] = torch.stack(grads).sum().sqrt().item()
    plain = [norms[False, r] for r in (4, 16, 64, 256)]
    stable = [norms[True, r] for r in (4, 16, 64, 256)]
    assert all(b < a for a, b in zip(plain, plain[1:])), plain
    assert plain[0] / plain[-1] > 5  # sqrt(256 / 4) = 8 in theory
    assert max(stable) / min(stable) < 1.6, stable
