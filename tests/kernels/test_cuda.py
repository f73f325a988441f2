"""The fused path on a CUDA GPU: same formula, same gradients; skipped without CUDA."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from tests.helpers import randomize_adapters, tiny_llama

from .test_kernels import CASES, adapted_linear, outputs_and_grads, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("case", list(CASES))
def test_fused_linear_on_cuda_matches_the_plain_formula(case):
    layer = adapted_linear(CASES[case]).cuda().train()
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, 4, 7, device="cuda")
    with _no_tf32():
        out, grads = outputs_and_grads(layer, x, 11, lambda m, v, s: m(v))
        ref_out, ref_grads = outputs_and_grads(layer, x, 11, reference)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class _no_tf32:
    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def test_bf16_base_with_float32_adapter_runs_fused_and_matches_float32_math():
    layer = adapted_linear({"a": {}, "b": {"use_dora": True}}, in_features=64, out=48).cuda()
    x = torch.randn(8, 64, device="cuda")
    with _no_tf32():
        expected = layer(x)
    layer.base_layer.to(torch.bfloat16)
    got = layer(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert layer.lora_A["a"].weight.dtype == torch.float32
    torch.testing.assert_close(got.float(), expected, rtol=3e-2, atol=3e-2)
    got.float().square().sum().backward()
    assert layer.lora_A["a"].weight.grad.dtype == torch.float32


def test_mixed_batch_training_on_cuda_matches_per_adapter_steps():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), "a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj", "v_proj"]))
    model.set_adapter(["a", "b"])
    randomize_adapters(model)
    model.cuda().train()
    ids = torch.randint(0, 100, (4, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    names = ["a", "b", "__base__", "a"]
    with _no_tf32():
        model(input_ids=ids, adapter_names=names).logits.square().mean(dim=(1, 2)).sum().backward()
        mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        for name in ("a", "b"):
            model.set_adapter(name)
            rows = [i for i, n in enumerate(names) if n == name]
            model(input_ids=ids[rows]).logits.square().mean(dim=(1, 2)).sum().backward()
    separate = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(mixed) == set(separate)
    for key in mixed:
        torch.testing.assert_close(mixed[key], separate[key], rtol=1e-4, atol=1e-5)


def test_adapted_layer_compiles_with_inductor_on_cuda():
    torch._dynamo.reset()
    layer = adapted_linear({"a": {}}, in_features=64, out=64).cuda().train()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(16, 64, device="cuda")
    with _no_tf32():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)
    assert isinstance(layer.base_layer, nn.Linear)
