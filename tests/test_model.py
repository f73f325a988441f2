"""The model API: adapters by name, enable/disable, merge/unmerge/unload, trainable parameters."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, PeftModelForCausalLM, get_peft_model, prepare_model_for_kbit_training
from lorakit.tuners.base import ModulesToSaveWrapper
from lorakit.tuners.lora.layer import LoraLayer
from tests.helpers import assert_same_state, randomize_adapters, state_snapshot, tiny_llama


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_only_adapter_parameters_train_and_names_are_pefts(llama, capsys):
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert isinstance(model, PeftModelForCausalLM)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(
        ".lora_A.default.weight" in n or ".lora_B.default.weight" in n for n in trainable
    )
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in trainable
    n_trainable, total = model.get_nb_trainable_parameters()
    # per layer: q_proj A (4, 32) + B (32, 4); v_proj A (4, 32) + B (16, 4) (2 kv heads x 8 dims)
    assert n_trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {n_trainable:,d} || all params: {total:,d} || trainable%: {100 * n_trainable / total:.4f}"
    )


def test_adapters_switch_and_inactive_ones_are_frozen(llama, input_ids):
    base = logits(llama, input_ids)
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    randomize_adapters(model)
    model.set_adapter("other")
    randomize_adapters(model, seed=2)
    assert model.active_adapter == "other" and model.active_adapters == ["other"]
    other = logits(model, input_ids)
    model.set_adapter("default")
    default = logits(model, input_ids)
    assert not torch.allclose(other, default) and not torch.allclose(default, base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base)
    torch.testing.assert_close(logits(model, input_ids), default)
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.set_adapter("missing")


def test_several_active_adapters_sum(llama, input_ids):
    base = logits(llama, input_ids)
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])
    randomize_adapters(model, std=0.02)
    both = logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    merged = model.merge_and_unload(adapter_names=["default", "other"])
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), both, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both, base)


def test_delete_adapter_removes_its_parameters_and_switches(llama):
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"] and model.active_adapter == "other"
    names = [n for n, _ in model.named_parameters()]
    assert not any(".default." in n for n in names)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoraLayer) and q_proj.adapter_names == []  # kept wrapped, as PEFT does
    with pytest.raises(ValueError, match="No adapter named"):
        model.delete_adapter("default")


def test_merge_and_unload_equals_unmerged_and_unload_restores_base(input_ids):
    base_model = tiny_llama()
    base = logits(base_model, input_ids)
    weights = {k: v.clone() for k, v in base_model.state_dict().items()}
    model = get_peft_model(base_model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, std=0.05)
    adapted = logits(model, input_ids)
    model.merge_adapter()
    restored = model.unload()  # unmerges before unloading: the base comes back as it was
    assert restored is base_model and not any(isinstance(m, LoraLayer) for m in restored.modules())
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(restored, input_ids), base, atol=1e-5, rtol=1e-5)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, std=0.05)
    merged = model.merge_and_unload(progressbar=True)
    torch.testing.assert_close(logits(merged, input_ids), adapted, atol=1e-5, rtol=1e-5)


def test_nan_adapter_refuses_to_merge_and_leaves_model_intact(llama):
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
    before = state_snapshot(model)
    with pytest.raises(
        ValueError, match=r"NaN/Inf in adapter 'default' in module 'model.layers.1.self_attn.v_proj'"
    ):
        model.merge_and_unload()
    assert_same_state(before, state_snapshot(model))


def test_safe_merge_catches_overflow_before_touching_weights(llama):
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.base_layer.weight.fill_(3e38)
        layer.lora_A["default"].weight.fill_(1e19)
        layer.lora_B["default"].weight.fill_(1e19)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="would put NaN/Inf"):
        model.merge_and_unload(safe_merge=True)
    assert_same_state(before, state_snapshot(model))


def test_injection_failure_midway_puts_every_module_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 3, groups=2), nn.Linear(4, 4))
    before = state_snapshot(model)
    with pytest.raises(NotImplementedError, match="grouped convolution"):
        get_peft_model(model, LoraConfig(target_modules=["0", "1", "2"]))
    assert_same_state(before, state_snapshot(model))


def test_modules_to_save_trains_a_copy_and_disable_uses_the_original(llama, input_ids):
    base = logits(llama, input_ids)
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    wrapper = model.base_model.model.lm_head
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert wrapper.modules_to_save["default"].weight.requires_grad
    assert not wrapper.original_module.weight.requires_grad
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.mul_(2)
    assert not torch.allclose(logits(model, input_ids), base)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base)
    assert model.lm_head.out_features == 100  # attribute reads reach the wrapped module


def test_modules_to_save_typo_is_an_error(llama):
    before = state_snapshot(llama)
    with pytest.raises(ValueError, match="modules_to_save entry 'lm_haed'"):
        get_peft_model(llama, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_haed"]))
    assert_same_state(before, state_snapshot(llama))


def test_bias_modes_choose_trainable_biases():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = get_peft_model(net, LoraConfig(target_modules=["0"], bias="lora_only"))
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {"base_model.model.0.base_layer.bias"}
    model = get_peft_model(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
        LoraConfig(target_modules=["0"], bias="all"),
    )
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {"base_model.model.0.base_layer.bias", "base_model.model.2.bias"}


def test_second_adapter_with_same_name_or_trained_bias_is_refused(llama):
    model = get_peft_model(llama, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="bias='none'"):
        model.add_adapter("b", LoraConfig(target_modules=["v_proj"], bias="all"))
    assert list(model.peft_config) == ["default"]


def test_get_peft_model_refuses_a_wrapped_model(llama):
    model = get_peft_model(llama, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="add_adapter"):
        get_peft_model(model, LoraConfig(target_modules=["v_proj"]))


def test_prepare_model_for_kbit_training_freezes_upcasts_norms_and_checkpoints():
    model = tiny_llama().to(torch.bfloat16)
    prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.is_gradient_checkpointing
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = peft_model(input_ids=torch.randint(0, 100, (2, 6)), labels=torch.randint(0, 100, (2, 6))).loss
    loss.backward()
    grad = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad
    assert grad is not None and torch.isfinite(grad).all()


def test_training_step_moves_only_the_adapter(llama, input_ids):
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
