"""layer_replication: repeated blocks share base weights, own their adapters, and merge exactly."""

import copy

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from tests.helpers import assert_same_state, randomize_adapters, state_snapshot, tiny_llama

LAYER_MAP = [[0, 4], [2, 4]]  # 0 1 2 3 2 3


def replicated(seed: int = 0):
    model = get_peft_model(
        tiny_llama(layers=4),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layer_replication=LAYER_MAP),
    )
    randomize_adapters(model, seed=seed)
    return model.eval()


def test_repeated_blocks_share_base_weights_and_own_their_adapters():
    model = replicated()
    layers = model.base_model.model.model.layers
    assert len(layers) == 6 and model.config.num_hidden_layers == 6
    assert layers[4].mlp.up_proj.weight is layers[2].mlp.up_proj.weight
    assert layers[4].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight
    assert (
        layers[4].self_attn.q_proj.lora_A["default"].weight
        is not layers[2].self_attn.q_proj.lora_A["default"].weight
    )
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(6))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 * 2 * 2


def test_merge_and_unload_of_a_replicated_model_is_exact():
    model = replicated()
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    layers = merged.model.layers
    assert layers[4].self_attn.q_proj.weight is not layers[2].self_attn.q_proj.weight  # untied to merge
    assert layers[4].mlp.up_proj.weight is layers[2].mlp.up_proj.weight  # untouched weights stay shared


def test_generation_with_kv_cache_matches_full_recompute():
    model = replicated()
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        logits = model(input_ids=generated[:, :-1], use_cache=False).logits
    assert torch.equal(logits[0, ids.shape[1] - 1 :].argmax(-1), generated[0, ids.shape[1] :])


def test_round_trip_rebuilds_the_stack(tmp_path):
    model = replicated()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(layers=4), tmp_path)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("layer_map, message", [([[0, 9]], "start < end <= 4"), ([[2, 2]], "start < end")])
def test_bad_ranges_are_errors_and_leave_the_model_alone(layer_map, message):
    base = tiny_llama(layers=4)
    before = state_snapshot(base)
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, LoraConfig(target_modules=["q_proj"], layer_replication=layer_map))
    assert_same_state(before, state_snapshot(base))


def test_failed_injection_after_replication_restores_the_stack():
    base = tiny_llama(layers=4)
    before = state_snapshot(base)
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(base, LoraConfig(target_modules=["q_prj"], layer_replication=LAYER_MAP))
    assert_same_state(before, state_snapshot(base))
    assert base.config.num_hidden_layers == 4


def test_second_adapter_must_share_the_layout():
    model = replicated()
    model.add_adapter("same", LoraConfig(r=2, target_modules=["q_proj"], layer_replication=LAYER_MAP))
    with pytest.raises(ValueError, match="share one block layout"):
        model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 4]]))
    assert len(copy.copy(model.base_model.model.model.layers)) == 6
