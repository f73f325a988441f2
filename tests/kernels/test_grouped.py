"""Sibling layers (q/k/v, gate/up) computing their A-projections in one matmul (`kernels.grouped`):
the groups form on a Llama, give the outputs and gradients of separate layers, and step aside
whenever a member cannot take part."""

import copy

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model, kernels
from lorakit.kernels import grouped
from tests.helpers import randomize_adapters, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def fresh_groups():
    kernels.forget_groups()
    yield
    kernels.forget_groups()
    kernels.share_dropout_masks(False)


def node_names(out: torch.Tensor) -> list[str]:
    names, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def run(model, ids, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Logits, gradients of every trainable tensor, and the number of grouped projections."""
    torch.manual_seed(seed)
    out = model(input_ids=ids).logits
    groups = node_names(out).count("GroupedProjectionBackward")
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads, groups


def alone_then_grouped(model, ids, seed: int = 0):
    """The first run learns the groups (every layer alone), the second uses them."""
    return run(model, ids, seed), run(model, ids, seed)


def assert_same(alone, together) -> None:
    """Equal to float32 rounding, relative to each tensor's largest element (the summation order
    of one stacked matmul differs from three thin ones)."""
    assert together[1].keys() == alone[1].keys()
    for name, want in [("logits", alone[0]), *alone[1].items()]:
        got = together[0] if name == "logits" else together[1][name]
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name


CONFIGS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "lora_bias": {"lora_bias": True},
    "dora": {"use_dora": True},
    "rank and alpha patterns": {"rank_pattern": {"k_proj": 2, "up_proj": 6}, "alpha_pattern": {"v_proj": 3}},
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_siblings_group_and_match_separate_layers(config, input_ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, **CONFIGS[config]))
    randomize_adapters(model)
    alone, together = alone_then_grouped(model.train(), input_ids)
    assert (alone[2], together[2]) == (0, 2 * 2)  # q/k/v and gate/up in each of the 2 layers
    assert_same(alone, together)


def test_groups_speed_up_inference_too(input_ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS)).eval()
    randomize_adapters(model)
    with torch.no_grad():
        alone = model(input_ids=input_ids).logits
        with_groups = model(input_ids=input_ids).logits
    assert grouped._groups  # learned in the first call, used in the second
    torch.testing.assert_close(with_groups, alone, rtol=1e-5, atol=1e-6)


def test_second_adapter_adds_to_the_grouped_first(input_ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"]))
    model.base_model.set_adapter(["default", "other"])
    randomize_adapters(model)
    alone, together = alone_then_grouped(model.train(), input_ids)
    assert together[2] == 4
    assert_same(alone, together)


def test_dropout_with_independent_masks_never_groups(input_ids):
    """PEFT's masks, one per layer: the A-projections read differently masked inputs."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=0.2))
    alone, together = alone_then_grouped(model.train(), input_ids)
    assert (alone[2], together[2]) == (0, 0)
    assert_same(alone, together)


def test_shared_dropout_masks_group_with_the_same_mask(input_ids):
    kernels.share_dropout_masks(True)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=0.2))
    randomize_adapters(model)
    alone, together = alone_then_grouped(model.train(), input_ids)
    assert together[2] == 4
    assert_same(alone, together)


@pytest.mark.parametrize(
    "change, groups_left", [("merge one", 3), ("disable", 3), ("mixed batch", 0), ("autocast", 0)]
)
def test_a_member_that_cannot_take_part_makes_its_group_run_alone(change, groups_left, input_ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS)).train()
    randomize_adapters(model)
    run(model, input_ids)  # learn the groups
    reference = copy.deepcopy(model)
    kwargs = {}
    if change == "merge one":
        for wrapped in (model, reference):
            wrapped.base_model.model.model.layers[0].self_attn.k_proj.merge()
    elif change == "disable":
        for wrapped in (model, reference):
            wrapped.base_model.model.model.layers[1].mlp.up_proj.enable_adapters(False)
    elif change == "mixed batch":
        kwargs = {"adapter_names": ["default", "__base__"]}
    torch.manual_seed(0)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if change == "autocast" else torch.enable_grad()
    with context:
        out = model(input_ids=input_ids, **kwargs).logits
        expected = reference(input_ids=input_ids, **kwargs).logits  # a copy has learned no groups
    assert node_names(out).count("GroupedProjectionBackward") == groups_left
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


class SplitReader(nn.Module):
    """Three projections that read one input at first, then two different ones."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.split = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = x * 2 if self.split else x
        return self.q(x) + self.k(other) + self.v(x)


def test_layers_that_stop_reading_one_input_are_regrouped_correctly():
    model = get_peft_model(
        SplitReader(), LoraConfig(r=2, target_modules=["q", "k", "v"], init_lora_weights=False)
    )
    x = torch.randn(3, 8)
    model(x), model(x)  # learned and used
    assert len(grouped._groups) == 3
    model.base_model.model.split = True
    with torch.no_grad():
        got = [model(x) for _ in range(3)]
        model.base_model.model.split = False
        kernels.forget_groups()
        model.base_model.model.split = True
        expected = model(x)  # every layer alone
    for out in got:
        torch.testing.assert_close(out, expected)
    assert not any({ref().module_name for ref in group} >= {"k", "q"} for group in grouped._groups.values())


def test_a_deep_copy_learns_its_own_groups(input_ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS)).train()
    randomize_adapters(model)
    run(model, input_ids)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.mul_(2)
    first, second = run(twin, input_ids), run(twin, input_ids)  # alone (learning), then its own groups
    assert (first[2], second[2]) == (0, 4)
    assert_same(first, second)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_gives_the_gradients_of_a_plain_run(reentrant, input_ids):
    """Checkpointing re-runs each layer's forward in backward; groups learned in between must not
    change what that re-run saves (non-reentrant checkpointing checks it)."""
    plain = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS)).train()
    randomize_adapters(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed.enable_input_require_grads()
    for _ in range(2):  # the first step learns the groups, the second may use them
        expected, got = run(plain, input_ids), run(checkpointed, input_ids)
        assert_same(expected, got)
