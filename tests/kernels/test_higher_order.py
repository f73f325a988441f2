"""Second-order autograd and torch.func through the fused path give PEFT's numbers (issue 16.1/16.2/16.7).

Each case builds one tiny eager-attention Llama, wraps a deep copy with lorakit and one with PEFT
0.21.2 (same adapter weights), and compares what both compute.
"""

import copy

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import kernels
from tests.helpers import randomize_adapters, tiny_llama

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def twins(adapters=("default",), **options):
    """(lorakit model, PEFT model) with the same base and adapter weights, in train mode."""
    base = tiny_llama()
    base.config._attn_implementation = "eager"  # SDPA on CPU has no double backward
    settings = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, **options)
    ours = lorakit.get_peft_model(
        copy.deepcopy(base), lorakit.LoraConfig(**settings), adapter_name=adapters[0]
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings), adapter_name=adapters[0])
    for name in adapters[1:]:
        ours.add_adapter(name, lorakit.LoraConfig(**settings))
        theirs.add_adapter(name, peft.LoraConfig(**settings))
    randomize_adapters(ours)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    if len(adapters) > 1:
        ours.base_model.set_adapter(list(adapters))
        theirs.base_model.set_adapter(list(adapters))
        for model in (ours, theirs):
            for param_name, param in model.named_parameters():
                param.requires_grad = "lora_" in param_name
    return ours.train(), theirs.train()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def hessian_vector_product(model, seed=1):
    """The gradient g of the LM loss and H v for v = ones, by double backward."""
    params = trainable(model)
    torch.manual_seed(seed)
    loss = model(input_ids=IDS, labels=IDS).loss
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * torch.ones_like(g)).sum() for g in grads)
    return grads, torch.autograd.grad(dot, params)


def assert_all_close(ours, theirs):
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


CASES = {
    "lora": {},
    "dora": {"use_dora": True},
    "dropout": {"lora_dropout": 0.1},
    "rslora_bias": {"use_rslora": True, "lora_bias": True},
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_hessian_vector_product_matches_peft(options):
    ours, theirs = twins(**options)
    hessian_vector_product(ours)  # a first step lets q/k/v learn their group, so the second is grouped
    assert_all_close(hessian_vector_product(ours)[1], hessian_vector_product(theirs)[1])


def test_hessian_vector_product_with_two_active_adapters_matches_peft():
    ours, theirs = twins(adapters=("first", "second"))
    assert_all_close(hessian_vector_product(ours)[1], hessian_vector_product(theirs)[1])


def test_gradient_penalty_on_the_input_embeddings_matches_peft():
    ours, theirs = twins(use_dora=True)
    results = []
    for model in (ours, theirs):
        embeds = model.get_input_embeddings()(IDS).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=IDS).loss
        (grad_embeds,) = torch.autograd.grad(loss, embeds, create_graph=True)
        penalty = grad_embeds.pow(2).sum()
        results.append(torch.autograd.grad(penalty, trainable(model)))
    assert_all_close(*results)


def test_double_backward_with_frozen_lora_a_raises_and_the_plain_path_matches_peft():
    ours, theirs = twins()
    for model in (ours, theirs):
        for param_name, param in model.named_parameters():
            if "lora_A" in param_name:
                param.requires_grad = False
    with pytest.raises(RuntimeError, match="use_fused_kernels"):
        hessian_vector_product(ours)
    kernels.use_fused_kernels(False)
    try:
        expected = hessian_vector_product(theirs)[1]
        assert_all_close(hessian_vector_product(ours)[1], expected)
    finally:
        kernels.use_fused_kernels(True)


def functional_loss(model):
    """`loss(params, ids)` of `model` through torch.func.functional_call, and its trainable params."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss(values, ids):
        logits = torch.func.functional_call(model, values, args=(), kwargs={"input_ids": ids}).logits
        return torch.nn.functional.cross_entropy(logits[..., :-1, :].flatten(0, 1), ids[..., 1:].flatten())

    return loss, params


def by_name(grads: dict, reference: dict) -> tuple[list, list]:
    """The two dicts' values in one order (PEFT's parameter names equal ours)."""
    assert grads.keys() == reference.keys()
    return [grads[k] for k in reference], list(reference.values())


@pytest.mark.parametrize("options", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_torch_func_grad_matches_peft(options):
    ours, theirs = twins(**options)
    ours.eval(), theirs.eval()
    results = []
    for model in (ours, theirs):
        loss, params = functional_loss(model)
        results.append(torch.func.grad(loss)(params, IDS))
    assert_all_close(*by_name(*results))


def test_per_sample_gradients_by_vmap_of_grad_match_peft():
    ours, theirs = twins()
    ours.eval(), theirs.eval()
    results = []
    for model in (ours, theirs):
        loss, params = functional_loss(model)
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, IDS.unsqueeze(1))
        results.append(per_sample)
    assert_all_close(*by_name(*results))


def test_jacrev_and_jvp_of_a_layer_match_peft():
    ours, theirs = twins(use_dora=True)
    x = torch.randn(3, 32)
    tangent = torch.randn(3, 32)
    jacobians, pushforwards = [], []
    for model in (ours, theirs):
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        jacobians.append(torch.func.jacrev(layer)(x))
        pushforwards.append(torch.func.jvp(layer, (x,), (tangent,))[1])
    assert_all_close(jacobians[:1], jacobians[1:])
    assert_all_close(pushforwards[:1], pushforwards[1:])


def test_dora_without_base_bias_then_inplace_relu_trains_as_peft():
    ours, theirs = twins(use_dora=True)
    grads = []
    x = torch.randn(2, 5, 32)
    for model in (ours, theirs):
        layer = model.base_model.model.model.layers[0].mlp.up_proj  # Llama: no bias
        nn.ReLU(inplace=True)(layer(x)).sum().backward()
        grads.append([p.grad for p in trainable(layer)])
    assert_all_close(*grads)


def test_dora_backward_twice_through_a_retained_graph_matches_peft():
    ours, theirs = twins(use_dora=True)
    grads = []
    for model in (ours, theirs):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append([p.grad for p in trainable(model)])
    assert_all_close(*grads)
