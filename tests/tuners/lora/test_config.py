"""LoraConfig: PEFT's fields and defaults, validation at construction, JSON round trip."""

import dataclasses
import json

import pytest

from lorakit import LoftQConfig, LoraConfig, PeftConfig, TaskType


def test_defaults_are_pefts():
    config = LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 8, 0.0, "none")
    assert config.init_lora_weights is True and config.use_rslora is False and config.fan_in_fan_out is False
    assert config.peft_type == "LORA" and config.rank_pattern == {} and config.alpha_pattern == {}


def test_field_set_matches_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert ours == theirs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "positive integer"),
        ({"r": 2.5}, "positive integer"),
        ({"lora_dropout": 1.0}, r"\[0, 1\)"),
        ({"bias": "some"}, "bias mode"),
        ({"target_modules": "q_proj", "layers_to_transform": [0]}, "regex target_modules"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
        ({"layers_to_transform": [-1]}, "non-negative"),
        ({"rank_pattern": {"q_proj": 0}}, "positive integers"),
        ({"rank_pattern": {"(": 4}}, "regular expression"),
        ({"alpha_pattern": {"q": "x"}}, "must be a finite number"),
        ({"init_lora_weights": "kaiming"}, "init strategy"),
        ({"init_lora_weights": "loftq"}, "loftq_config"),
        ({"loftq_config": LoftQConfig()}, "not 'loftq'"),
        ({"task_type": "TRANSLATE"}, "task type"),
        ({"target_modules": "(unclosed"}, "regular expression"),
        ({"target_modules": ["q", 3]}, "module names"),
        ({"use_dora": True, "lora_bias": True}, "cannot be combined"),
    ],
)
def test_contradictory_or_invalid_settings_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_target_modules_list_becomes_a_set_and_saves_sorted(tmp_path):
    config = LoraConfig(target_modules=["v_proj", "q_proj"], task_type=TaskType.CAUSAL_LM)
    assert config.target_modules == {"q_proj", "v_proj"}
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["target_modules"] == ["q_proj", "v_proj"]
    assert data["task_type"] == "CAUSAL_LM" and data["inference_mode"] is True
    assert "runtime_config" not in data
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoraConfig) and loaded.target_modules == {"q_proj", "v_proj"}


def test_unknown_json_keys_warn_and_are_dropped(tmp_path):
    data = LoraConfig(target_modules=["q"]).to_dict() | {"future_option": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="future_option"):
        PeftConfig.from_pretrained(tmp_path)


def test_config_from_other_peft_type_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        PeftConfig.from_pretrained(tmp_path)


def test_corrupted_config_json_names_the_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PeftConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"init_lora_weights": "eva"}, "init_lora_weights"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"target_parameters": ["experts.weight"]}, "target_parameters"),
    ],
)
def test_stored_but_unbuilt_options_raise_naming_the_field(kwargs, field):
    config = LoraConfig(**kwargs)  # accepted and stored, so PEFT's files still parse
    with pytest.raises(NotImplementedError, match=field):
        config.check_supported()
