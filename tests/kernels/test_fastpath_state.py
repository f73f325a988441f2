"""Per-call state of the fast path: mixed batches, sibling groups and hooks give the plain formula."""

import copy
import threading

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from tests.helpers import randomize_adapters, tiny_llama


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


def two_adapter_llama() -> torch.nn.Module:
    config = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    model = get_peft_model(tiny_llama(), config, adapter_name="a")
    model.add_adapter("b", config)
    randomize_adapters(model)
    return model


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_mixed_batch_grads_under_gradient_checkpointing_equal_per_adapter_steps(use_reentrant):
    model = two_adapter_llama()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(2))
    weight = torch.randn(4, 6, 100, generator=torch.Generator().manual_seed(3))
    names = ["a", "b", "__base__", "a"]
    for name, rows in (("a", [0, 3]), ("b", [1])):
        reference.set_adapter(name)
        (reference(input_ids=ids[rows]).logits * weight[rows]).sum().backward()
    model.set_adapter(["a", "b"])
    model.train()
    model.base_model.model.enable_input_require_grads()
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
    )
    (model(input_ids=ids, adapter_names=names).logits * weight).sum().backward()
    got, expected = lora_grads(model), lora_grads(reference)
    assert got.keys() == expected.keys() and len(got) == 40
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_threads_running_mixed_batches_get_their_own_adapter_names():
    model = two_adapter_llama()
    model.set_adapter(["a", "b"])
    jobs = [
        (torch.randint(0, 100, (n, length), generator=torch.Generator().manual_seed(n)), names, grad)
        for n, length, names, grad in (
            (3, 5, ["a", "b", "__base__"], False),
            (2, 7, ["b", "b"], True),
            (4, 4, ["__base__", "a", "a", "b"], True),
            (1, 9, ["a"], False),
        )
    ]

    def run(ids, names, grad):
        with torch.set_grad_enabled(grad):
            return model(input_ids=ids, adapter_names=names).logits.detach()

    expected = [run(*job) for job in jobs]
    errors = []

    def worker(k):
        for _ in range(8):
            got = run(*jobs[k])
            if not torch.allclose(got, expected[k], rtol=1e-5, atol=1e-6):
                errors.append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def peft_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same base, config and adapter weights under PEFT."""
    import peft

    twin = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    )
    ours = dict(model.named_parameters())
    theirs = dict(twin.named_parameters())
    assert ours.keys() == theirs.keys()
    with torch.no_grad():
        for name, param in theirs.items():
            param.copy_(ours[name])
    return twin


def hook_all(model: torch.nn.Module) -> list[str]:
    """Count-and-change hooks on every adapter submodule, and a pre-hook on each k_proj that changes
    its own scaling (after q_proj, its sibling, has run)."""
    calls = []
    for name, module in model.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            module.register_forward_hook(lambda m, i, o, name=name: calls.append(name) or o * 1.5)
        elif name.endswith("lora_dropout.default"):
            module.register_forward_pre_hook(lambda m, i, name=name: calls.append(name))
        elif name.endswith("k_proj"):
            module.register_forward_pre_hook(lambda m, i: m.scaling.update(default=m.scaling["default"] * 2))
    return calls


def test_hooks_on_adapter_submodules_fire_and_match_peft():
    model = lora_llama()
    twin = peft_twin(model)
    ours, theirs = hook_all(model), hook_all(twin)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    for _ in range(3):  # the first call learns sibling groups, later ones would use them
        got, expected = model(input_ids=ids).logits, twin(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ours == theirs and len(ours) == 3 * 2 * 3 * 3
