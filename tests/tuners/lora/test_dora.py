"""DoRA against its definition: `W' = m * (W + s B A) / ||W + s B A||` (row norms, detached)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, get_peft_model
from lorakit.targeting import TargetPlan
from lorakit.tuners.lora.dispatch import create_lora_layer
from lorakit.tuners.lora.dora import row_norm


def dora_layer(base: nn.Module, **config) -> nn.Module:
    cfg = LoraConfig(
        r=3, lora_alpha=6, use_dora=True, target_modules=["x"], init_lora_weights=False, **config
    )
    layer = create_lora_layer(base, cfg, "x")
    layer.update_layer("default", TargetPlan(3, 6, False), cfg)
    layer.set_adapter("default")
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():  # move the magnitude away from its init so the tests see it
        magnitude.mul_(torch.linspace(0.5, 1.5, magnitude.numel()).view_as(magnitude))
    return layer


def reference_weight(layer) -> torch.Tensor:
    """The DoRA weight in rows layout, straight from the paper's formula."""
    direction = layer._base_rows() + layer._delta_rows("default")
    magnitude = layer.lora_magnitude_vector["default"].weight.reshape(-1)
    shape = (-1,) + (1,) * (direction.dim() - 1)
    return magnitude.view(shape) * direction / row_norm(direction).view(shape)


def test_linear_output_is_the_decomposed_weight_applied():
    torch.manual_seed(0)
    layer = dora_layer(nn.Linear(8, 5))
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), F.linear(x, reference_weight(layer), layer.base_layer.bias))


def test_gpt2_conv1d_output_is_the_decomposed_weight_applied():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        layer = dora_layer(Conv1D(5, 8))
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(layer(x), F.linear(x, reference_weight(layer), layer.base_layer.bias))


def test_embedding_output_is_the_decomposed_table_looked_up():
    torch.manual_seed(0)
    layer = dora_layer(nn.Embedding(12, 6))
    ids = torch.tensor([[1, 4, 11], [0, 0, 7]])
    assert layer.lora_magnitude_vector["default"].weight.shape == (6,)
    torch.testing.assert_close(layer(ids), F.embedding(ids, reference_weight(layer).t()))


def test_conv_output_is_the_decomposed_kernel_applied():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=1)
    layer = dora_layer(base)
    assert layer.lora_magnitude_vector["default"].weight.shape == (1, 4, 1, 1)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(
        layer(x), base._conv_forward(x, reference_weight(layer), base.bias), atol=1e-5, rtol=1e-5
    )


def test_magnitude_starts_at_the_row_norms_so_step_zero_is_plain_lora():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    cfg = LoraConfig(r=3, use_dora=True, target_modules=["x"])
    layer = create_lora_layer(base, cfg, "x")
    layer.update_layer("default", TargetPlan(3, 8, False), cfg)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, base.weight.norm(dim=1))
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), base(x))


def test_gradient_reaches_the_magnitude_and_not_through_the_norm():
    torch.manual_seed(0)
    layer = dora_layer(nn.Linear(8, 5), lora_dropout=0.0)
    x = torch.randn(4, 8)
    layer(x).square().sum().backward()
    magnitude = layer.lora_magnitude_vector["default"].weight
    assert magnitude.grad is not None and magnitude.grad.abs().sum() > 0
    # reference gradient of A with the norm treated as a constant (the paper's section 4.3)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a_ref = a.detach().clone().requires_grad_(True)
    direction = layer.base_layer.weight + 2.0 * b.detach() @ a_ref
    norm = row_norm(direction).detach()
    out = F.linear(x, magnitude.detach()[:, None] * direction / norm[:, None], layer.base_layer.bias)
    out.square().sum().backward()
    torch.testing.assert_close(a.grad, a_ref.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "base, x",
    [
        (nn.Linear(8, 5), torch.randn(2, 8)),
        (nn.Embedding(12, 6), torch.randint(0, 12, (2, 4))),
        (nn.Conv1d(3, 4, 3), torch.randn(2, 3, 9)),
    ],
    ids=["linear", "embedding", "conv"],
)
def test_merge_is_exact_and_unmerge_restores(base, x):
    torch.manual_seed(0)
    layer = dora_layer(base)
    before, weight = layer(x), base.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


def test_merging_dora_with_another_adapter_is_refused_cleanly(llama):
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.add_adapter("plain", LoraConfig(r=4, target_modules=["q_proj"]))
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(ValueError, match="DoRA adapter 'default' rescales"):
        model.merge_and_unload(adapter_names=["default", "plain"])
    torch.testing.assert_close(
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, weight
    )


def test_dora_trains_and_saves_the_magnitude(llama, tmp_path):
    from safetensors.torch import load_file

    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight" in names
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"].shape == (32,)
