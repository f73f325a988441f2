"""Every LoRA layer type against the plain formula `W x + scaling * (B A dropout(x) + b)`."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig
from lorakit.targeting import TargetPlan
from lorakit.tuners.lora.dispatch import create_lora_layer
from lorakit.tuners.lora.layer import Conv, Embedding, Linear


def wrap(base: nn.Module, r: int = 4, alpha: float = 8, rslora: bool = False, **config) -> nn.Module:
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["x"], **config)
    layer = create_lora_layer(base, cfg, "x")
    layer.update_layer("default", TargetPlan(r, alpha, rslora), cfg)
    layer.set_adapter("default")
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return layer


def test_linear_forward_and_grads_match_formula():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(6, 5), lora_bias=True)
    x = torch.randn(3, 4, 6, requires_grad=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"]
    out = layer(x)
    expected = F.linear(x, layer.base_layer.weight, layer.base_layer.bias) + 2.0 * (
        x @ a.t() @ b.weight.t() + b.bias
    )
    torch.testing.assert_close(out, expected)
    (g_out,) = torch.autograd.grad(out.square().sum(), [a], retain_graph=False)
    (g_exp,) = torch.autograd.grad(expected.square().sum(), [a])
    torch.testing.assert_close(g_out, g_exp)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    layer = wrap(nn.Linear(6, 5), r=16, alpha=8, rslora=True)
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(16))
    plain = wrap(nn.Linear(6, 5), r=16, alpha=8)
    assert plain.scaling["default"] == pytest.approx(8 / 16)


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(6, 5), lora_dropout=0.5).train()
    x = torch.randn(8, 6)
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(out, layer.base_layer(x) + 2.0 * dropped @ a.t() @ b.t())


def test_gpt2_conv1d_uses_transposed_weight_and_merges():
    torch.manual_seed(0)
    base = Conv1D(5, 6)  # nf=5 outputs, nx=6 inputs; weight stored (6, 5)
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        layer = wrap(base)
    assert isinstance(layer, Linear) and layer.fan_in_fan_out
    x = torch.randn(2, 3, 6)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ base.weight + base.bias + 2.0 * x @ a.t() @ b.t()
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_embedding_looks_up_rows_of_a_and_respects_padding_idx():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = wrap(base)
    assert isinstance(layer, Embedding)
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    expected = base(ids) + 2.0 * (a.t()[ids] @ b.t())
    torch.testing.assert_close(layer(ids), expected)
    layer.merge()
    torch.testing.assert_close(layer(ids), expected, atol=1e-5, rtol=1e-5)


def test_embedding_default_init_is_zero_a_normal_b():
    cfg = LoraConfig(r=4, target_modules=["e"])
    layer = create_lora_layer(nn.Embedding(10, 6), cfg, "e")
    layer.update_layer("default", TargetPlan(4, 8, False), cfg)
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0
    assert layer.lora_embedding_B["default"].std() > 0


@pytest.mark.parametrize(
    "base",
    [
        nn.Conv1d(3, 4, 3, stride=2, padding=1),
        nn.Conv2d(3, 4, (3, 2), padding=1, dilation=2),
        nn.Conv3d(2, 4, 3, stride=1, padding=1, bias=False),
    ],
    ids=["conv1d", "conv2d", "conv3d"],
)
def test_conv_forward_equals_merged_weight_convolution(base):
    torch.manual_seed(0)
    layer = wrap(base)
    assert isinstance(layer, Conv)
    x = torch.randn(2, base.in_channels, *([7] * (base.weight.dim() - 2)))
    expected = base._conv_forward(x, base.weight + layer.get_delta_weight("default"), base.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_linear_init_true_keeps_function_and_gaussian_uses_std_one_over_r():
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    cfg = LoraConfig(r=8, target_modules=["x"], init_lora_weights="gaussian")
    layer = create_lora_layer(base, cfg, "x")
    layer.update_layer("default", TargetPlan(8, 8, False), cfg)
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), base(x))


def test_merge_then_unmerge_restores_base_weight():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(6, 5), lora_bias=True)
    weight, bias = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
    x = torch.randn(4, 6)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, weight)
    torch.testing.assert_close(layer.base_layer.bias, bias)


def test_two_active_adapters_add_up():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    cfg = LoraConfig(r=2, target_modules=["x"])
    layer = create_lora_layer(base, cfg, "x")
    for name in ("one", "two"):
        layer.update_layer(name, TargetPlan(2, 4, False), cfg)
    with torch.no_grad():
        for name in ("one", "two"):
            layer.lora_A[name].weight.normal_(0, 0.2)
            layer.lora_B[name].weight.normal_(0, 0.2)
    x = torch.randn(3, 6)
    layer.set_adapter(["one"])
    one = layer(x) - base(x)
    layer.set_adapter(["two"])
    two = layer(x) - base(x)
    layer.set_adapter(["one", "two"])
    torch.testing.assert_close(layer(x), base(x) + one + two, atol=1e-6, rtol=1e-5)


def test_half_precision_base_keeps_float32_adapters():
    base = nn.Linear(6, 5).to(torch.bfloat16)
    layer = wrap(base)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = layer(torch.randn(2, 6, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
