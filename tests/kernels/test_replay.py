"""Layer inputs rebuilt in backward from tensors autograd keeps anyway (`lorakit.kernels.replay`):
the gradients are those of saving the input, and a LoRA Llama keeps only rank-r tensors more than
the frozen model."""

import copy

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.kernels import grouped
from lorakit.kernels import linear as fused
from lorakit.kernels.replay import replay_for
from tests.helpers import randomize_adapters, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def leaf(*shape: int, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape).requires_grad_(grad)


def test_a_product_of_two_tensors_needing_gradients_is_rebuilt_exactly():
    gate, up = leaf(4, 6), leaf(4, 6)
    x = torch.nn.functional.silu(gate) * up
    replay = replay_for(x)
    assert replay is not None
    replay.add_user()
    assert torch.equal(replay.take(), x)


def test_rmsnorm_output_is_rebuilt_through_its_two_multiplications():
    h, weight = leaf(4, 6), torch.rand(6)  # a frozen norm weight: its product keeps only the weight
    x = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    replay = replay_for(x)
    assert replay is not None
    replay.add_user()
    assert torch.equal(replay.take(), x)


@pytest.mark.parametrize(
    "make",
    [
        lambda a, b: (a * b).view(-1),  # a view
        lambda a, b: a * 2.0,  # a product with a number keeps no tensor
        lambda a, b: torch.nn.functional.layer_norm(a * b, (6,)),
        lambda a, b: (a * b).mul_(1.0),  # changed in place
        lambda a, b: a.detach() * b.detach(),  # needs no gradient
        lambda a, b: a * torch.rand(6),  # the frozen factor's partner is a leaf: never kept
    ],
    ids=["view", "scalar", "layer_norm", "in-place", "no-grad", "unsaved-leaf"],
)
def test_inputs_that_cannot_be_rebuilt_are_saved(make):
    assert replay_for(make(leaf(4, 6), leaf(4, 6))) is None


def test_layers_reading_one_input_share_one_rebuild():
    x = leaf(4, 6) * leaf(4, 6)
    first, second = replay_for(x), replay_for(x)
    assert first is second
    first.add_user()
    first.add_user()
    assert first.take() is first.take()  # the second user gets the cached tensor, then it is dropped
    assert first._value is None


def test_an_input_changed_in_place_after_the_layer_still_gets_the_gradient_of_its_old_value():
    """`.data` hides the change from autograd, so a saved input would silently give the gradient of
    the new value; the rebuilt one is the value the layer read."""
    torch.manual_seed(0)
    a, b = leaf(5, 6), leaf(5, 6)
    weight_a, weight_b = leaf(3, 6), leaf(4, 3)
    x = a * b
    out = fused.fused_linear(None, x, torch.randn(4, 6), None, weight_a, weight_b, None, None, 2.0, 0.0)
    read = x.detach().clone()
    x.data.add_(1.0)
    (grad_a,) = torch.autograd.grad(out.sum(), [weight_a])
    grad_hidden = torch.ones(5, 4) @ weight_b.detach() * 2.0
    torch.testing.assert_close(grad_a, grad_hidden.t() @ read)


def model_grads(model, embeds, ids) -> dict[str, torch.Tensor]:
    embeds = embeds.clone().requires_grad_(True)
    model(inputs_embeds=embeds, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["inputs_embeds"] = embeds.grad
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(
    "config", [{}, {"lora_dropout": 0.2}, {"use_dora": True}], ids=["lora", "dropout", "dora"]
)
def test_llama_gradients_are_the_same_with_and_without_rebuilding_inputs(monkeypatch, config):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, **config))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach()
    model_grads(model, embeds, ids)  # q/k/v and gate/up learn they are siblings: both runs group
    torch.manual_seed(3)
    rebuilt = model_grads(model, embeds, ids)
    monkeypatch.setattr(fused, "replay_for", lambda x: None)
    monkeypatch.setattr(grouped, "replay_for", lambda x: None)
    torch.manual_seed(3)
    kept = model_grads(model, embeds, ids)
    assert rebuilt.keys() == kept.keys()
    for name, grad in kept.items():
        assert torch.equal(rebuilt[name], grad), name


def saved_storages(model: nn.Module, forward) -> dict[int, int]:
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return storages


def test_lora_llama_keeps_only_rank_r_tensors_more_than_the_frozen_model():
    """Every adapted input of a float32 Llama (RMSNorm outputs, act(gate) * up, attention output)
    is rebuilt or already kept by the frozen model; what LoRA adds is one (tokens, r) tensor per
    adapted layer."""
    r, layers = 4, 2
    frozen = tiny_llama(layers=layers).train().requires_grad_(False)
    model = get_peft_model(copy.deepcopy(frozen), LoraConfig(r=r, target_modules=LLAMA_TARGETS)).train()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    embeds = frozen.get_input_embeddings()(ids).detach().requires_grad_(True)
    floor = saved_storages(frozen, lambda: frozen(inputs_embeds=embeds, labels=ids).loss)
    lora = saved_storages(model, lambda: model(inputs_embeds=embeds, labels=ids).loss)
    extra = sum(lora.values()) - sum(floor.values())
    assert extra == len(LLAMA_TARGETS) * layers * ids.numel() * r * 4
