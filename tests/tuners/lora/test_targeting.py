"""The targeting plan: which modules get an adapter, with which rank and alpha."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from lorakit import LoraConfig, get_peft_model
from lorakit.targeting import layer_index, name_matches, pattern_value
from lorakit.tuners.lora.layer import LoraLayer
from tests.helpers import assert_same_state, state_snapshot


def adapted(model) -> list[str]:
    return sorted(
        n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)
    )


def test_list_matches_whole_names_or_dot_suffixes_only():
    assert name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert name_matches("q_proj", ["q_proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert not name_matches("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert not name_matches("model.layers.0.self_attn.q_proj", ["proj"])


def test_string_is_a_full_regex_match():
    assert name_matches("model.layers.1.mlp.up_proj", r".*\.1\.mlp\.(up|down)_proj")
    assert not name_matches("model.layers.1.mlp.up_proj", r"up_proj")


def test_layer_index_with_and_without_pattern():
    assert layer_index("model.layers.12.mlp.up_proj", None) == 12
    assert layer_index("transformer.h.3.attn.c_attn", "h") == 3
    assert layer_index("model.layers.3.mlp.up_proj", "h") is None
    assert layer_index("lm_head", None) is None


def test_pattern_keys_match_at_a_dot_boundary():
    pattern = {"q_proj": 16, r"layers\.0\.self_attn\.v_proj": 2}
    assert pattern_value(pattern, "model.layers.1.self_attn.q_proj", 8) == 16
    assert pattern_value(pattern, "model.layers.0.self_attn.v_proj", 8) == 2
    assert pattern_value(pattern, "model.layers.1.self_attn.v_proj", 8) == 8
    assert pattern_value(pattern, "model.layers.1.self_attn.xq_proj", 8) == 8


def test_rank_and_alpha_patterns_set_per_module_r_and_scaling(llama):
    config = LoraConfig(
        r=8,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 32},
    )
    model = get_peft_model(llama, config)
    layers = {n.split(".", 2)[-1]: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    q = layers["model.layers.0.self_attn.q_proj"]
    v = layers["model.layers.0.self_attn.v_proj"]
    assert q.r["default"] == 8 and q.scaling["default"] == 4.0
    assert v.r["default"] == 2 and v.scaling["default"] == 4.0
    assert v.lora_A["default"].weight.shape == (2, 32)


def test_layers_to_transform_restricts_targets(llama):
    model = get_peft_model(
        llama, LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    )
    assert adapted(model) == ["model.layers.1.self_attn.q_proj"]


def test_exclude_modules_removes_matches(llama):
    model = get_peft_model(llama, LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]))
    assert all(n.endswith("q_proj") for n in adapted(model))


def test_all_linear_skips_the_output_head(llama):
    model = get_peft_model(llama, LoraConfig(target_modules="all-linear"))
    names = adapted(model)
    assert "lm_head" not in names and len(names) == 2 * 7
    assert model.peft_config["default"].target_modules == set(names)


def test_default_targets_follow_the_architecture():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16))
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = get_peft_model(gpt2, LoraConfig())
    assert adapted(model) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert model.peft_config["default"].fan_in_fan_out is True


def test_unknown_architecture_without_targets_says_what_to_pass():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="pass target_modules explicitly"):
        get_peft_model(model, LoraConfig())


def test_typo_in_target_modules_suggests_the_near_name_and_leaves_model_unchanged(llama):
    before = state_snapshot(llama)
    with pytest.raises(ValueError, match=r"matched no module.*did you mean 'q_proj'"):
        get_peft_model(llama, LoraConfig(target_modules=["q_prj"]))
    assert_same_state(before, state_snapshot(llama))


def test_target_of_unsupported_type_is_named(llama):
    with pytest.raises(ValueError, match=r"input_layernorm.*LlamaRMSNorm.*cannot adapt"):
        get_peft_model(llama, LoraConfig(target_modules=["input_layernorm", "q_proj"]))


def test_everything_excluded_is_an_error(llama):
    with pytest.raises(ValueError, match="excluded"):
        get_peft_model(llama, LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_layers_to_transform_selecting_nothing_lists_found_indices(llama):
    with pytest.raises(ValueError, match=r"found among them: \[0, 1\]"):
        get_peft_model(llama, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


def test_rank_pattern_key_matching_nothing_warns(llama):
    with pytest.warns(UserWarning, match="rank_pattern key 'k_prj'"):
        get_peft_model(llama, LoraConfig(target_modules=["q_proj"], rank_pattern={"k_prj": 4}))
