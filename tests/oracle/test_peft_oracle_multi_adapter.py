"""Two adapters on the tiny Llama: files, loading, switching, deleting and merging vs PEFT."""

import os

import peft
import pytest

from .oracle_helpers import (
    adapter_files,
    assert_outputs_differ,
    assert_same_outputs,
    base_model,
    lora_config,
    lorakit,
    outputs,
    perturb_adapters,
    saved_config,
    saved_shapes,
    trainable_names,
    wrap,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARCH = "llama"
FIRST = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
SECOND = dict(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "o_proj"], use_rslora=True)
NAMES = ("default", "other")


def _two_adapters(lib, perturb=True):
    model = wrap(lib, ARCH, **FIRST)
    model.add_adapter("other", lora_config(lib, "CAUSAL_LM", **SECOND))
    if perturb:
        perturb_adapters(model, seed=11)
    return model


def _load_two(lib, directory):
    model = lib.PeftModel.from_pretrained(base_model(ARCH), directory)
    model.load_adapter(os.path.join(directory, "other"), adapter_name="other")
    return model.eval()


def _outputs_per_adapter(model):
    result = {}
    for name in NAMES:
        model.set_adapter(name)
        result[name] = outputs(model, ARCH)
    return result


def test_second_adapter_is_saved_in_a_subfolder_like_peft(tmp_path):
    _two_adapters(lorakit, perturb=False).save_pretrained(tmp_path / "lk")
    _two_adapters(peft, perturb=False).save_pretrained(tmp_path / "pf")
    expected = adapter_files(tmp_path / "pf")
    assert os.path.join("other", "adapter_model.safetensors") in expected
    assert adapter_files(tmp_path / "lk") == expected
    for sub in ("", "other"):
        assert saved_shapes(tmp_path / "lk" / sub) == saved_shapes(tmp_path / "pf" / sub), sub
        lk_cfg, pf_cfg = saved_config(tmp_path / "lk" / sub), saved_config(tmp_path / "pf" / sub)
        assert set(lk_cfg) == set(pf_cfg), sub
        assert {k: lk_cfg[k] for k in ("r", "lora_alpha", "use_rslora")} == {
            k: pf_cfg[k] for k in ("r", "lora_alpha", "use_rslora")
        }, sub


def test_lorakit_two_adapter_save_loads_in_peft_and_switches_identically(tmp_path):
    lk = _two_adapters(lorakit)
    lk.save_pretrained(tmp_path)
    expected = _outputs_per_adapter(_load_two(peft, tmp_path))
    actual = _outputs_per_adapter(lk)
    assert_outputs_differ(expected["default"], expected["other"], "the two adapters")
    for name in NAMES:
        assert_same_outputs(actual[name], expected[name], f"adapter {name!r}")


def test_peft_two_adapter_save_loads_in_lorakit_and_switches_identically(tmp_path):
    pf = _two_adapters(peft)
    pf.save_pretrained(tmp_path)
    expected = _outputs_per_adapter(pf)
    actual = _outputs_per_adapter(_load_two(lorakit, tmp_path))
    assert_outputs_differ(expected["default"], expected["other"], "the two adapters")
    for name in NAMES:
        assert_same_outputs(actual[name], expected[name], f"adapter {name!r}")


def test_add_adapter_and_set_adapter_update_active_and_trainable_like_peft():
    lk, pf = _two_adapters(lorakit, perturb=False), _two_adapters(peft, perturb=False)
    assert lk.active_adapter == pf.active_adapter == "default"
    assert list(lk.active_adapters) == list(pf.active_adapters)
    assert trainable_names(lk) == trainable_names(pf)
    assert {n for n, _ in lk.named_parameters()} == {n for n, _ in pf.named_parameters()}
    lk.set_adapter("other")
    pf.set_adapter("other")
    assert lk.active_adapter == pf.active_adapter == "other"
    assert trainable_names(lk) == trainable_names(pf)
    assert any(".other." in n for n in trainable_names(pf))
    assert tuple(lk.get_nb_trainable_parameters()) == tuple(pf.get_nb_trainable_parameters())


def _after_deleting_other(tmp_path):
    lk = _two_adapters(lorakit)
    lk.save_pretrained(tmp_path)
    pf = _load_two(peft, tmp_path)
    for model in (lk, pf):
        model.set_adapter("default")
        model.delete_adapter("other")
    return lk, pf


def test_delete_adapter_leaves_the_same_parameter_names_as_peft(tmp_path):
    """PEFT keeps emptied LoRA wrappers (k_proj/o_proj keep `.base_layer.`) after delete_adapter."""
    lk, pf = _after_deleting_other(tmp_path)
    assert not any(".other." in n for n, _ in lk.named_parameters())
    assert {n for n, _ in lk.named_parameters()} == {n for n, _ in pf.named_parameters()}


def test_delete_adapter_leaves_the_same_outputs_and_adapters_as_peft(tmp_path):
    lk, pf = _after_deleting_other(tmp_path)
    assert lk.active_adapter == pf.active_adapter == "default"
    assert set(lk.peft_config) == set(pf.peft_config) == {"default"}
    assert_same_outputs(outputs(lk, ARCH), outputs(pf, ARCH), "after delete_adapter('other')")


def test_selected_adapters_saves_only_the_chosen_adapter_like_peft(tmp_path):
    _two_adapters(lorakit, perturb=False).save_pretrained(tmp_path / "lk", selected_adapters=["other"])
    _two_adapters(peft, perturb=False).save_pretrained(tmp_path / "pf", selected_adapters=["other"])
    expected = adapter_files(tmp_path / "pf")
    assert expected == {
        os.path.join("other", f) for f in ("adapter_config.json", "adapter_model.safetensors")
    }
    assert adapter_files(tmp_path / "lk") == expected


def test_merge_and_unload_with_adapter_names_matches_peft(tmp_path):
    lk = _two_adapters(lorakit)
    lk.save_pretrained(tmp_path)
    pf = _load_two(peft, tmp_path)
    lk_merged = lk.merge_and_unload(adapter_names=["other"])
    pf_merged = pf.merge_and_unload(adapter_names=["other"])
    expected = outputs(pf_merged, ARCH)
    assert_outputs_differ(expected, outputs(base_model(ARCH), ARCH), "merged 'other' vs base")
    assert_same_outputs(outputs(lk_merged, ARCH), expected, "merge_and_unload(adapter_names=['other'])")
