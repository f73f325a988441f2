"""Mixed-adapter batches: `adapter_names=[...]`, one adapter per sample, in inference and training."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.targeting import TargetPlan
from lorakit.tuners.lora.dispatch import create_lora_layer
from tests.helpers import randomize_adapters, tiny_llama

NAMES = ["a", "b", "d"]


def mixed_model(dropout: float = 0.0):
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=dropout),
        adapter_name="a",
    )
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"]))
    model.add_adapter("d", LoraConfig(r=3, lora_alpha=3, use_dora=True, target_modules=["k_proj", "v_proj"]))
    model.set_adapter(NAMES)  # every adapter trainable
    randomize_adapters(model, seed=3)
    return model


def ids(batch: int) -> torch.Tensor:
    return torch.randint(0, 100, (batch, 6), generator=torch.Generator().manual_seed(1))


def per_sample_reference(model, input_ids, names):
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(input_ids=input_ids[i : i + 1]).logits)
        else:
            model.set_adapter(name)
            rows.append(model(input_ids=input_ids[i : i + 1]).logits)
    model.set_adapter(NAMES)
    return torch.cat(rows)


@pytest.mark.parametrize(
    "names",
    [["a", "b", "__base__", "d", "a"], ["a", "a", "b", "b", "d"], ["b"] * 5],
    ids=["interleaved", "blocks", "one-adapter"],
)
def test_mixed_batch_matches_each_sample_run_with_its_own_adapter(names):
    model = mixed_model().eval()
    input_ids = ids(len(names))
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
        expected = per_sample_reference(model, input_ids, names)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def sample_loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.pow(2).mean(dim=(1, 2)).sum()  # a sum of per-sample terms


def test_one_mixed_training_step_equals_separate_steps_per_adapter():
    model = mixed_model().train()
    names = ["a", "d", "b", "__base__", "a", "d", "b", "b"]
    input_ids = ids(len(names))
    sample_loss(model(input_ids=input_ids, adapter_names=names).logits).backward()
    mixed = grads(model)
    model.zero_grad(set_to_none=True)

    for name in NAMES:
        index = [i for i, n in enumerate(names) if n == name]
        model.set_adapter(name)
        sample_loss(model(input_ids=input_ids[index]).logits).backward()
    model.set_adapter(NAMES)
    separate = grads(model)

    assert set(mixed) == set(separate)
    for key in separate:
        torch.testing.assert_close(mixed[key], separate[key], rtol=1e-5, atol=1e-6, msg=key)
    for name in NAMES:  # every adapter got a gradient, from its own samples only
        assert any(f".{name}." in key and mixed[key].abs().sum() > 0 for key in mixed)


def test_mixed_training_gradient_reaches_only_the_samples_adapter():
    model = mixed_model().train()
    names = ["b", "b", "__base__"]
    sample_loss(model(input_ids=ids(3), adapter_names=names).logits).backward()
    touched = {n.split(".")[-2] for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert touched == {"b"}


def test_mixed_batch_generate_matches_per_prompt_generation():
    model = mixed_model().eval()
    prompts = ids(3)
    names = ["d", "__base__", "a"]
    out = model.generate(input_ids=prompts, adapter_names=names, max_new_tokens=4, do_sample=False)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=prompts[i : i + 1], max_new_tokens=4, do_sample=False)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=prompts[i : i + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(out[i : i + 1], alone)


def test_mixed_batch_rejects_unknown_names_wrong_length_and_merged_adapters():
    model = mixed_model().eval()
    with pytest.raises(ValueError, match="unknown adapter"):
        model(input_ids=ids(2), adapter_names=["a", "nope"])
    with pytest.raises(ValueError, match="one adapter name per sample"):
        model(input_ids=ids(3), adapter_names=["a", "b"])
    for layer in model.modules():  # nothing is left in mixed mode after an error
        assert getattr(layer, "sample_adapters", None) is None
    model.set_adapter("a")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model(input_ids=ids(2), adapter_names=["a", "b"])


def two_adapter_layer(base: nn.Module, **config) -> nn.Module:
    layer = create_lora_layer(base, LoraConfig(target_modules=["x"], init_lora_weights=False, **config), "x")
    for name, dora in (("one", False), ("two", True)):
        cfg = LoraConfig(target_modules=["x"], init_lora_weights=False, use_dora=dora, **config)
        layer.update_layer(name, TargetPlan(2, 3, False), cfg)
    layer.set_adapter(["one", "two"])
    return layer


@pytest.mark.parametrize(
    "base, x",
    [
        (nn.Linear(6, 5), torch.randn(4, 3, 6)),
        (nn.Conv2d(3, 4, 3, padding=1), torch.randn(4, 3, 5, 5)),
        (nn.Embedding(10, 5), torch.tensor([[1, 2], [3, 4], [5, 9], [0, 7]])),
    ],
    ids=["linear", "conv2d", "embedding"],
)
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
def test_every_layer_type_runs_mixed_batches_with_lora_and_dora(base, x, grad):
    """With autograd each adapter's rows are gathered; in inference runs of samples add in place."""
    torch.manual_seed(0)
    layer = two_adapter_layer(base)
    names = ["two", "__base__", "one", "two"]
    layer.sample_adapters = names
    with torch.set_grad_enabled(grad):
        mixed = layer(x)
    layer.sample_adapters = None
    for i, name in enumerate(names):
        if name == "__base__":
            expected = layer.base_layer(x[i : i + 1])
        else:
            layer.set_adapter(name)
            expected = layer(x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], expected, rtol=1e-5, atol=1e-6)


def test_modules_to_save_copies_run_per_sample_too():
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
        LoraConfig(target_modules=["0"], modules_to_save=["2"], init_lora_weights=False),
        adapter_name="a",
    )
    model.add_adapter("b", LoraConfig(target_modules=["0"], modules_to_save=["2"], init_lora_weights=False))
    with torch.no_grad():
        for copy in model.base_model.model[2].modules_to_save.values():
            copy.weight.normal_()
    x = torch.randn(3, 4)
    names = ["b", "a", "__base__"]
    mixed = model(x, adapter_names=names)
    expected = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected.append(model(x[i : i + 1]))
        else:
            model.set_adapter(name)
            expected.append(model(x[i : i + 1]))
    torch.testing.assert_close(mixed, torch.cat(expected))


def test_adapter_layers_without_mixed_batch_support_are_refused():
    from lorakit.tuners.base import AdapterLayer

    class Plain(AdapterLayer):
        def forward(self, x):
            return self.base_layer(x)

    model = mixed_model().eval()
    model.base_model.model.lm_head = Plain(model.base_model.model.lm_head)
    with pytest.raises(ValueError, match="not supported by Plain"):
        model(input_ids=ids(2), adapter_names=["a", "b"])


def test_bottleneck_adapters_refuse_mixed_batches():
    from lorakit import BottleneckConfig

    model = get_peft_model(tiny_llama(), BottleneckConfig(target_modules=["mlp"], bottleneck_size=4))
    with pytest.raises(ValueError, match="not supported by BottleneckLayer"):
        model(input_ids=ids(2), adapter_names=["default", "__base__"])
