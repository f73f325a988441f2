"""Probes of the fused fast path against PEFT 0.21.2 on the same tiny Llama (same weights, same
seed): layer inputs rebuilt in backward after another backward freed their producer's graph
(`kernels/replay.py`), and dropout masks on non-contiguous inputs (`kernels/linear.py`)."""

import gc
import weakref

import pytest
import torch

import lorakit
from lorakit import kernels
from tests.oracle.oracle_helpers import base_model, lora_config, perturb_adapters

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def twins(**config):
    """(lorakit, PEFT) models on one seed-built Llama with the same (non-zero) adapter weights, in train mode."""
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, **config)
    ours, theirs = (
        lib.get_peft_model(base_model("llama"), lora_config(lib, "CAUSAL_LM", **config))
        for lib in (lorakit, peft)
    )
    perturb_adapters(ours)
    weights = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(weights[name])
    return ours.train(), theirs.train()


def layer_of(model, index: int = 1):
    return model.base_model.model.model.layers[index]


def lora_params(module) -> list[torch.Tensor]:
    return [p for n, p in sorted(module.named_parameters()) if "lora_" in n]


def hidden(seed: int = 0) -> torch.Tensor:
    """A residual-stream input (2, 7, 32) that needs a gradient, as after a trained layer."""
    return torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def assert_same_grads(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs) and all(g is not None for g in ours + theirs)
    for i, (got, expected) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m, i=i: f"grad {i}: {m}")


# --- item 8: a layer input rebuilt in backward after its producer's graph was freed -------------


def loss_on_norm_first(model) -> list[torch.Tensor]:
    """Two losses share an RMSNorm output: one on the output itself backpropagates first (freeing the
    norm's graph), then one through q_proj asks only for q_proj's LoRA gradients."""
    layer = layer_of(model)
    x = layer.input_layernorm(hidden())
    q = layer.self_attn.q_proj(x)
    x.square().sum().backward()
    params = lora_params(layer.self_attn.q_proj)
    q.square().sum().backward(inputs=params)
    return [p.grad for p in params]


def loss_on_product_first(model) -> list[torch.Tensor]:
    """The same with the MLP product `act(gate) * up` and down_proj."""
    mlp = layer_of(model).mlp
    h = hidden()
    product = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
    down = mlp.down_proj(product)
    product.sum().backward()
    params = lora_params(mlp.down_proj)
    down.square().sum().backward(inputs=params)
    return [p.grad for p in params]


def second_forward_after_backward(model) -> list[torch.Tensor]:
    """A norm output read by q_proj, backpropagated, then read by q_proj again in a new forward."""
    layer = layer_of(model)
    x = layer.input_layernorm(hidden())
    q_proj = layer.self_attn.q_proj
    q_proj(x).sum().backward()
    return torch.autograd.grad(q_proj(x).square().sum(), lora_params(q_proj))


@pytest.mark.parametrize(
    "pattern",
    [loss_on_norm_first, loss_on_product_first, second_forward_after_backward],
    ids=["norm output", "mlp product", "second forward"],
)
def test_a_layer_input_whose_producer_graph_was_freed_gets_pefts_gradients(pattern):
    ours, theirs = twins()
    assert_same_grads(pattern(ours), pattern(theirs))


def test_the_rebuild_holds_no_tensor_after_the_last_backward_that_needs_it():
    """While the graph lives, the LoRA layer keeps nothing of its input beyond what the norm keeps:
    once backward has used the rebuild, the norm's input is freed when the caller drops it."""
    ours, _ = twins()
    layer = layer_of(ours)
    h = hidden() * 1.0  # not a leaf: only the graph and this frame hold it
    gone = weakref.ref(h)
    out = layer.self_attn.q_proj(layer.input_layernorm(h))
    out.sum().backward()
    del h
    gc.collect()
    assert out.grad_fn is not None and gone() is None


# --- item 10: dropout masks on non-contiguous inputs ---------------------------------------------

# name -> (shape of the leaf, how the layer input is made from it); each input is (..., 32)
LAYOUTS = {
    "contiguous": ((6, 5, 32), lambda t: t * 1.0),
    "transposed batch and sequence": ((5, 6, 32), lambda t: t.transpose(0, 1)),
    "transposed matrix": ((32, 10), lambda t: t.t()),
    "permuted, flattens to a view": ((32, 6, 5), lambda t: t.permute(1, 2, 0)),
    "strided feature slice": ((6, 5, 64), lambda t: t[..., ::2]),
    "strided sequence slice": ((6, 10, 32), lambda t: t[:, ::2]),
    "two strided slices": ((12, 10, 32), lambda t: t[::2, ::2]),
    "expanded batch": ((1, 5, 32), lambda t: t.expand(6, 5, 32)),
    "4-d permuted": ((2, 32, 3, 4), lambda t: t.permute(0, 2, 3, 1)),
    "channels-last slice": ((2, 32, 6, 4), lambda t: t.permute(0, 2, 3, 1)[:, ::2]),
}
# layouts the fused path keeps (it draws the mask on the flattened input, a view of it here)
FUSED_LAYOUTS = [
    "contiguous",
    "transposed matrix",
    "permuted, flattens to a view",
    "strided feature slice",
    "strided sequence slice",
]


def dropout_run(model, layout: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """q_proj on the layout's input under seed 7: the output, and the gradients of its LoRA factors
    and of the leaf the input was made from."""
    shape, make = LAYOUTS[layout]
    source = torch.randn(*shape, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    q_proj = layer_of(model).self_attn.q_proj
    torch.manual_seed(7)
    out = q_proj(make(source))
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
    params = [*lora_params(q_proj), source]
    return out, list(torch.autograd.grad((out * weights).sum(), params))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dropout_on_any_input_layout_drops_what_pefts_dropout_drops(layout):
    ours, theirs = twins(lora_dropout=0.1)
    (out, grads), (expected, expected_grads) = dropout_run(ours, layout), dropout_run(theirs, layout)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert_same_grads(grads, expected_grads)
    ours.eval()
    assert not torch.allclose(out, dropout_run(ours, layout)[0])  # dropout did drop something


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_shared_mask_is_drawn_as_pefts_dropout_draws_it_for_the_first_reader(layout):
    ours, theirs = twins(lora_dropout=0.1)
    kernels.share_dropout_masks(True)
    try:
        (out, grads), (expected, expected_grads) = dropout_run(ours, layout), dropout_run(theirs, layout)
    finally:
        kernels.share_dropout_masks(False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert_same_grads(grads, expected_grads)


@pytest.mark.parametrize("layout", FUSED_LAYOUTS)
def test_layouts_whose_mask_the_fused_path_draws_stay_fused(layout):
    ours, _ = twins(lora_dropout=0.1)
    shape, make = LAYOUTS[layout]
    out = layer_of(ours).self_attn.q_proj(make(torch.randn(*shape, requires_grad=True)))
    assert type(out.grad_fn).__name__ == "ViewBackward0"
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "LoraLinearFunctionBackward"


def twice_with_retained_graph(model) -> list[torch.Tensor]:
    """One forward through q_proj backpropagated twice, the graph retained the first time."""
    layer = layer_of(model)
    out = layer.self_attn.q_proj(layer.input_layernorm(hidden())).square().sum()
    params = lora_params(layer.self_attn.q_proj)
    out.backward(retain_graph=True, inputs=params)
    out.backward(inputs=params)
    return [p.grad for p in params]


def test_a_retained_graph_backpropagated_twice_gets_pefts_gradients():
    ours, theirs = twins()
    assert_same_grads(twice_with_retained_graph(ours), twice_with_retained_graph(theirs))


def test_a_factor_changed_in_place_after_the_forward_is_an_error_naming_the_fix():
    """PEFT's saved input would hide the change; the rebuild would silently use the new value."""
    ours, _ = twins()
    layer = layer_of(ours)
    h = hidden() * 1.0
    out = layer.self_attn.q_proj(layer.input_layernorm(h))
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match=r"modified in place after that layer's forward.*clone"):
        out.sum().backward(inputs=lora_params(layer.self_attn.q_proj))
