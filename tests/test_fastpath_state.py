"""Per-call state of the fast path: mixed batches, sibling groups and hooks give the plain formula."""

import torch

from lorakit import LoraConfig, get_peft_model
from tests.conftest import randomize_adapters, tiny_llama


def lora_llama(**config):
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], **config)
    )
    randomize_adapters(model)
    return model


def test_empty_mixed_batch_in_training_keeps_its_shape():
    model = lora_llama()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.sample_adapters = []
    out = layer(torch.randn(0, 5, 32))
    layer.sample_adapters = None
    assert out.shape == (0, 5, 32)


def test_inference_mode_runs_and_matches_no_grad():
    model = lora_llama()
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)


def test_lora_a_of_later_siblings_gets_grads_when_first_sibling_ran_without_grad():
    model = lora_llama()
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 3, 32)
    for _ in range(2):  # learn the group, then use it
        with torch.no_grad():
            attn.q_proj(x)
        out = attn.k_proj(x) + attn.v_proj(x)
    out.sum().backward()
    assert attn.k_proj.lora_A["default"].weight.grad is not None
    assert attn.v_proj.lora_A["default"].weight.grad is not None


def test_forward_hook_on_lora_a_fires_and_changes_the_output():
    model = lora_llama()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    layer.lora_A["default"].register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)
    x = torch.randn(2, 3, 32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (x @ a.t() * 2) @ b.t() * layer.scaling["default"]
    torch.testing.assert_close(layer(x), expected)
    assert calls == [1]
