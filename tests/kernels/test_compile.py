"""`torch.compile` on lorakit models: no graph break inside an adapted layer, eager-equal results."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.targeting import TargetPlan
from lorakit.tuners.lora.dispatch import create_lora_layer
from tests.helpers import randomize_adapters, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")


def lora_linear(**config) -> nn.Module:
    torch.manual_seed(0)
    cfg = LoraConfig(target_modules=["x"], init_lora_weights=False, **config)
    layer = create_lora_layer(nn.Linear(8, 6), cfg, "x")
    layer.update_layer("default", TargetPlan(4, 8.0, False), cfg)
    layer.set_adapter("default")
    return layer


@pytest.mark.parametrize(
    "config", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "lora_bias"]
)
def test_adapted_layer_compiles_as_one_graph_forward_and_backward(config):
    torch._dynamo.reset()
    layer = lora_linear(**config).train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    x = torch.randn(3, 5, 8)
    params = [p for p in layer.parameters() if p.requires_grad]
    expected = layer(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    got = compiled(x)
    got_grads = torch.autograd.grad(got.square().sum(), params)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_explain_finds_no_graph_break_in_the_adapted_layer():
    torch._dynamo.reset()
    layer = lora_linear().train()
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 8))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_compiled_wrapped_model_matches_eager_loss_and_gradients():
    torch._dynamo.reset()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params)
    compiled = torch.compile(model, backend="aot_eager")
    compiled_loss = compiled(input_ids=ids, labels=ids).loss
    compiled_grads = torch.autograd.grad(compiled_loss, params)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
