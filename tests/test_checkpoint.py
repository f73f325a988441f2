"""Files: PEFT's layout, atomic writes, and loads that either fit exactly or change nothing."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit.save_and_load as checkpoint
from lorakit import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from tests.helpers import assert_same_state, randomize_adapters, state_snapshot, tiny_llama


def trained(tmp_path, **config):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **config))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_round_trip_gives_identical_outputs(tmp_path, input_ids):
    model = trained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model.eval(), input_ids), atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.training
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(".default" not in k for k in keys)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_trainable_load_trains_and_inference_load_stays_frozen_after_disable(tmp_path):
    trained(tmp_path)
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with frozen.disable_adapter():
        pass
    assert not any(p.requires_grad for p in frozen.parameters())


def test_named_adapters_go_to_subfolders_and_load_by_name(tmp_path, input_ids):
    model = trained(tmp_path / "a")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    model.set_adapter("other")
    randomize_adapters(model, seed=5)
    other = logits(model.eval(), input_ids)
    model.save_pretrained(tmp_path / "b", selected_adapters=["other"])
    assert os.listdir(tmp_path / "b") == ["other"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    loaded.load_adapter(tmp_path / "b" / "other", adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded, input_ids), other, atol=0, rtol=0)
    with pytest.raises(ValueError, match="selected_adapters"):
        model.save_pretrained(tmp_path / "c", selected_adapters=["nope"])


def test_bin_files_load_with_weights_only(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert "adapter_model.bin" in os.listdir(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model.eval(), input_ids))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_in_a_bin_file_is_refused(tmp_path):
    trained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with open(tmp_path / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": _Payload()}, fh)
    base = tiny_llama()
    before = state_snapshot(base)
    with pytest.raises(ValueError, match="weights_only=True"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_same_state(before, state_snapshot(base))


def test_corrupted_weights_file_is_named_and_model_untouched(tmp_path):
    trained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    base = tiny_llama()
    before = state_snapshot(base)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_same_state(before, state_snapshot(base))


def test_shape_mismatch_names_the_key_and_model_is_restored(tmp_path):
    trained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_llama()
    before = state_snapshot(base)
    with pytest.raises(
        ValueError,
        match=r"shape mismatch for base_model\.model\.model\.layers\.0\..*file \(4, 32\), model \(8, 32\)",
    ):
        PeftModel.from_pretrained(base, tmp_path)
    assert_same_state(before, state_snapshot(base))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    trained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, path)
    base = tiny_llama()
    before = state_snapshot(base)
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(base, tmp_path)
    assert f"missing keys {dropped}" in str(err.value)
    assert "unexpected keys base_model.model.model.layers.0.mlp.up_proj.lora_A.weight" in str(err.value)
    assert_same_state(before, state_snapshot(base))


def test_failed_load_adapter_leaves_existing_adapters_alone(tmp_path):
    trained(tmp_path / "good")
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    other.save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"garbage")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "good")
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        model.load_adapter(tmp_path / "bad", adapter_name="bad")
    assert list(model.peft_config) == ["default"]
    assert_same_state(before, state_snapshot(model))


def test_weights_that_do_not_fit_are_rolled_back_on_load_adapter(tmp_path):
    trained(tmp_path / "good")
    trained(tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj", "k_proj"]
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(config))
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "good")
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="missing keys .*k_proj"):
        model.load_adapter(tmp_path / "bad", adapter_name="bad")
    assert list(model.peft_config) == ["default"]
    assert_same_state(before, state_snapshot(model))


def test_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="No adapter_config.json"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "empty")


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, input_ids, monkeypatch):
    model = trained(tmp_path)
    reference = logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), input_ids)
    randomize_adapters(model, seed=9)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut while writing")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), input_ids), reference
    )


def test_state_dict_helpers_round_trip(input_ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(model)
    state = get_peft_model_state_dict(model)
    other = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    set_peft_model_state_dict(other, state)
    torch.testing.assert_close(logits(other.eval(), input_ids), logits(model.eval(), input_ids))
    with pytest.raises(ValueError, match="shape mismatch"):
        set_peft_model_state_dict(other, {k: v[:1] for k, v in state.items()})


def test_rejected_save_writes_nothing(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="selected_adapters"):
        model.save_pretrained(tmp_path / "out", selected_adapters=["default", "typo"])
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
