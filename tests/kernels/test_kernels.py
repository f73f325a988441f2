"""The fused LoRA path (`lorakit.kernels.LoraLinearFunction`) against the plain formula:
outputs and every gradient, with dropout (fixed seed), lora_bias, DoRA and several adapters."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, kernels
from lorakit.targeting import TargetPlan
from lorakit.tuners.base import AdapterLayer
from lorakit.tuners.lora.dispatch import create_lora_layer
from lorakit.tuners.lora.dora import row_norm


def adapted_linear(names: dict[str, dict], bias: bool = True, in_features: int = 7, out: int = 5):
    """An nn.Linear with one adapter per entry of `names` ({name: LoraConfig kwargs}), random factors."""
    torch.manual_seed(0)
    base = nn.Linear(in_features, out, bias=bias)
    base.requires_grad_(False)
    first = LoraConfig(target_modules=["x"], init_lora_weights=False)
    layer = create_lora_layer(base, first, "x")
    for i, (name, kwargs) in enumerate(names.items()):
        cfg = LoraConfig(target_modules=["x"], init_lora_weights=False, **kwargs)
        layer.update_layer(name, TargetPlan(2 + i, 3.0 + i, False), cfg)
    layer.set_adapter(list(names))
    with torch.no_grad():
        for name in names:
            if name in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector[name].weight.mul_(torch.linspace(0.5, 1.5, out))
            if layer.lora_B[name].bias is not None:
                layer.lora_B[name].bias.normal_()
    return layer


def reference(layer, x: torch.Tensor, seed: int) -> torch.Tensor:
    """`W x + b + sum_k s_k (B_k A_k drop_k(x) + b_Bk)`, DoRA as `f (W x + s B A x) + b`."""
    torch.manual_seed(seed)
    base = layer.base_layer
    result = F.linear(x, base.weight, base.bias)
    for name in layer.active_adapters:
        a, b, s = layer.lora_A[name].weight, layer.lora_B[name], layer.scaling[name]
        dropout = layer.lora_dropout[name]
        dropped = F.dropout(x, dropout.p, dropout.training) if isinstance(dropout, nn.Dropout) else x
        lora = s * F.linear(F.linear(dropped, a), b.weight, b.bias)
        if layer.use_dora[name]:
            direction = base.weight + s * b.weight @ a
            factor = layer.lora_magnitude_vector[name].weight / row_norm(direction).detach()
            bias = 0 if base.bias is None else base.bias
            result = factor * (result - bias + lora) + bias
        else:
            result = result + lora
    return result


def outputs_and_grads(layer, x, seed, fn):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = fn(layer, x, seed)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return out, grads


CASES = {
    "one adapter": {"a": {}},
    "lora_bias": {"a": {"lora_bias": True}},
    "two adapters": {"a": {}, "b": {"lora_bias": True}},
    "dora": {"a": {"use_dora": True}},
    "lora then dora": {"a": {}, "b": {"use_dora": True}},
    "dropout": {"a": {"lora_dropout": 0.3}},
    "dropout, two adapters": {"a": {"lora_dropout": 0.3}, "b": {"lora_dropout": 0.5}},
}


@pytest.mark.parametrize("bias", [True, False], ids=["base-bias", "no-bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_linear_matches_the_plain_formula_outputs_and_gradients(case, bias):
    layer = adapted_linear(CASES[case], bias=bias).train()
    if bias:
        layer.base_layer.bias.requires_grad_(True)  # bias="all": the base bias trains too
    x = torch.randn(3, 4, 7)
    out, grads = outputs_and_grads(layer, x, 11, lambda m, v, s: m(v))
    ref_out, ref_grads = outputs_and_grads(layer, x, 11, reference)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dropout_drops_the_same_elements_as_nn_dropout_with_the_same_seed():
    layer = adapted_linear({"a": {"lora_dropout": 0.5}}).train()
    x = torch.randn(2, 50, 7)
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    again = layer(x)
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first, reference(layer, x, 3), rtol=1e-5, atol=1e-6)


def test_dora_gradient_is_exact_when_a_magnitude_is_zero():
    layer = adapted_linear({"a": {"use_dora": True}}, bias=False).train()
    with torch.no_grad():
        layer.lora_magnitude_vector["a"].weight[2] = 0.0
    x = torch.randn(4, 7)
    _, grads = outputs_and_grads(layer, x, 0, lambda m, v, s: m(v))
    _, ref_grads = outputs_and_grads(layer, x, 0, reference)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def saved_bytes(layer, x) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


def test_backward_keeps_the_input_once_plus_rank_r_tensors():
    """LoRA saves x (shared), the rank-r hidden and parameters: no full-size output, no float mask."""
    n, d = 256, 64
    for p, extra in ((0.0, 0), (0.2, n * d)):  # dropout adds only a one-byte keep-mask
        layer = adapted_linear({"a": {"lora_dropout": p}}, in_features=d, out=d).train()
        x = torch.randn(n, d, requires_grad=True)
        params = sum(t.untyped_storage().nbytes() for t in layer.parameters())
        assert saved_bytes(layer, x) - params <= n * d * 4 + n * 2 * 4 + extra


def test_dora_saves_at_most_one_output_sized_tensor():
    n, d = 256, 64
    layer = adapted_linear({"a": {"use_dora": True}}, bias=False, in_features=d, out=d).train()
    x = torch.randn(n, d, requires_grad=True)
    params = sum(t.untyped_storage().nbytes() for t in layer.parameters())
    assert saved_bytes(layer, x) - params <= 2 * n * d * 4 + n * 2 * 4 + 4 * d * 4


def test_every_adapted_linear_goes_through_the_fused_function():
    layer = adapted_linear({"a": {}, "b": {"use_dora": True}})
    out = layer(torch.randn(2, 7, requires_grad=True))
    names = []
    node = out.grad_fn
    while node is not None:
        names.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    assert names.count("LoraLinearFunctionBackward") == 2
    assert isinstance(layer, AdapterLayer)


@pytest.mark.parametrize("case", ["one adapter", "dora", "dropout"])
def test_trainable_base_weight_gets_the_plain_gradient(case):
    layer = adapted_linear(CASES[case]).train()
    layer.base_layer.requires_grad_(True)
    x = torch.randn(5, 7)
    out, grads = outputs_and_grads(layer, x, 2, lambda m, v, s: m(v))
    ref_out, ref_grads = outputs_and_grads(layer, x, 2, reference)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_fused_path_matches_the_formula():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(5, 7)
    base.requires_grad_(False)
    with pytest.warns(UserWarning):
        layer = create_lora_layer(base, LoraConfig(target_modules=["x"], init_lora_weights=False), "x")
    cfg = LoraConfig(target_modules=["x"], init_lora_weights=False, fan_in_fan_out=True, lora_dropout=0.2)
    layer.update_layer("a", TargetPlan(3, 6.0, False), cfg)
    layer.set_adapter("a")
    layer.train()
    x = torch.randn(2, 4, 7, requires_grad=True)
    torch.manual_seed(4)
    out = layer(x)
    torch.manual_seed(4)
    dropped = F.dropout(x, 0.2, True)
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = x @ base.weight + base.bias + 2.0 * dropped @ a.t() @ b.t()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), [x, a, b])
    ref = torch.autograd.grad(expected.square().sum(), [x, a, b])
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_hooks_on_the_base_layer_still_run():
    layer = adapted_linear({"a": {}})
    seen = []
    layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(3, 7)
    out = layer(x)
    assert seen == [(3, 5)]
    torch.testing.assert_close(out, reference(layer, x, 0), rtol=1e-5, atol=1e-6)


def test_inference_without_grad_matches_the_training_path():
    layer = adapted_linear({"a": {}, "b": {"use_dora": True}}).eval()
    x = torch.randn(4, 7)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x).detach())
    torch.testing.assert_close(fast, reference(layer, x, 0), rtol=1e-5, atol=1e-6)


class SameInputTwice(nn.Module):
    """Two adapted linears reading the same tensor, like q_proj and k_proj."""

    def __init__(self):
        super().__init__()
        self.q = adapted_linear({"a": {"lora_dropout": 0.5}})
        self.k = adapted_linear({"a": {"lora_dropout": 0.5}})

    def forward(self, x):
        return self.q(x), self.k(x)


@pytest.fixture
def sharing():
    kernels.share_dropout_masks(True)
    yield
    kernels.share_dropout_masks(False)


def plain_with_mask(layer, x, mask):
    a, b, s = layer.lora_A["a"].weight, layer.lora_B["a"].weight, layer.scaling["a"]
    base = layer.base_layer
    return F.linear(x, base.weight, base.bias) + s * F.linear(F.linear(x * mask, a), b)


def test_shared_dropout_masks_give_layers_reading_one_input_one_mask(sharing):
    model = SameInputTwice().train()
    x = torch.randn(6, 7, requires_grad=True)
    torch.manual_seed(9)
    q, k = model(x)
    torch.manual_seed(9)
    mask = F.dropout(torch.ones(6, 7), 0.5, True)  # the single draw both layers use
    expected = plain_with_mask(model.q, x, mask), plain_with_mask(model.k, x, mask)
    torch.testing.assert_close(q, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, expected[1], rtol=1e-5, atol=1e-6)
    params = [x, model.q.lora_A["a"].weight, model.k.lora_A["a"].weight]
    got = torch.autograd.grad((q.square().sum() + k.sum()), params)
    want = torch.autograd.grad(expected[0].square().sum() + expected[1].sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_shared_dropout_masks_draw_anew_for_a_new_input(sharing):
    model = SameInputTwice().train()
    torch.manual_seed(0)
    first = model.q(torch.ones(50, 7))
    second = model.q(torch.ones(50, 7))  # equal values, another tensor: another mask
    assert not torch.equal(first, second)


def test_dropout_masks_are_independent_per_layer_by_default():
    model = SameInputTwice().train()
    x = torch.ones(50, 7)
    torch.manual_seed(0)
    q, k = model(x)
    torch.manual_seed(0)
    mask = F.dropout(torch.ones(50, 7), 0.5, True)
    torch.testing.assert_close(q, plain_with_mask(model.q, x, mask), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(k, plain_with_mask(model.k, x, mask))  # k drew its own mask


def test_cpu_autocast_bf16_runs_forward_and_backward():
    layer = adapted_linear({"a": {}, "b": {"use_dora": True}}).train()
    x = torch.randn(4, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    assert layer.lora_A["a"].weight.grad is not None and x.grad is not None
    torch.testing.assert_close(out.float(), reference(layer, x, 0).detach(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("p", [0.1, 1 / 3, 0.5, 0.999, 1e-9])
@pytest.mark.parametrize("threads", [1, 2])
def test_keep_mask_is_f_dropouts_draw_and_advances_the_generator_alike(p, threads):
    """Default dropout keeps PEFT's masks: the integer draw picks exactly the elements `F.dropout`
    keeps for the same seed, and leaves the global generator where `F.dropout` leaves it."""
    from lorakit.kernels.linear import _keep_mask

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(3, 65, 97)
        torch.manual_seed(11)
        expected, expected_next = F.dropout(x, p, True) != 0, torch.rand(5)
        torch.manual_seed(11)
        keep, following = _keep_mask(x, p), torch.rand(5)
    finally:
        torch.set_num_threads(before)
    assert keep.dtype == torch.uint8 and keep.shape == x.shape
    assert torch.equal(keep.bool(), expected)
    assert torch.equal(following, expected_next)
    if p == 0.5:  # a mask that keeps everything or nothing would make this test vacuous
        assert 0.45 < keep.float().mean().item() < 0.55
