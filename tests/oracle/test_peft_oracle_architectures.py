"""lorakit vs PEFT on tiny Llama, GPT-2, BERT (SEQ_CLS), T5 (SEQ_2_SEQ_LM) and a conv net.

For each architecture both libraries wrap the same seed-built base weights with the same LoRA
settings, and must agree on parameter counts and names, on the files they write, and on outputs
when either one's files are loaded by the other.
"""

import os

import peft
import pytest
import torch

from .oracle_helpers import (
    ARCH_LORA_KWARGS,
    ARCHS,
    CONFIG_VALUE_KEYS,
    TASK_TYPES,
    adapter_files,
    assert_outputs_differ,
    assert_same_outputs,
    base_model,
    load,
    lora_config,
    lorakit,
    model_inputs,
    normalized_config_values,
    outputs,
    perturb_adapters,
    saved_config,
    saved_shapes,
    trainable_names,
    wrap,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PEFT_CLASS_FOR_TASK = {
    "CAUSAL_LM": "PeftModelForCausalLM",
    "SEQ_CLS": "PeftModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "PeftModelForSeq2SeqLM",
    None: "PeftModel",
}


def _both(arch):
    kwargs = ARCH_LORA_KWARGS[arch]
    return wrap(lorakit, arch, **kwargs), wrap(peft, arch, **kwargs)


def _saved_by(lib, arch, directory, seed=0):
    """Wrap with `lib`, make the adapter non-trivial, save to `directory`; return the model."""
    model = wrap(lib, arch, **ARCH_LORA_KWARGS[arch])
    perturb_adapters(model, seed=seed)
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_get_peft_model_returns_the_peft_class_for_the_task(arch):
    lk, pf = _both(arch)
    assert type(pf).__name__ == PEFT_CLASS_FOR_TASK[TASK_TYPES[arch]]
    assert type(lk).__name__ == type(pf).__name__
    assert isinstance(lk, lorakit.PeftModel)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_and_total_parameter_counts_match_peft(arch):
    lk, pf = _both(arch)
    expected = pf.get_nb_trainable_parameters()
    assert expected[0] > 0
    assert tuple(lk.get_nb_trainable_parameters()) == tuple(expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameter_names_match_peft(arch):
    lk, pf = _both(arch)
    expected = trainable_names(pf)
    assert expected
    assert trainable_names(lk) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_all_parameter_names_and_shapes_match_peft(arch):
    lk, pf = _both(arch)
    expected = {n: tuple(p.shape) for n, p in pf.named_parameters()}
    assert {n: tuple(p.shape) for n, p in lk.named_parameters()} == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_safetensors_keys_and_shapes_match_peft(arch, tmp_path):
    lk, pf = _both(arch)
    lk.save_pretrained(tmp_path / "lk")
    pf.save_pretrained(tmp_path / "pf")
    expected = saved_shapes(tmp_path / "pf")
    assert expected
    assert saved_shapes(tmp_path / "lk") == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_adapter_config_matches_peft(arch, tmp_path):
    lk, pf = _both(arch)
    lk.save_pretrained(tmp_path / "lk")
    pf.save_pretrained(tmp_path / "pf")
    lk_cfg, pf_cfg = saved_config(tmp_path / "lk"), saved_config(tmp_path / "pf")
    assert set(lk_cfg) == set(pf_cfg), (
        f"only lorakit: {set(lk_cfg) - set(pf_cfg)}, only PEFT: {set(pf_cfg) - set(lk_cfg)}"
    )
    assert set(CONFIG_VALUE_KEYS) <= set(pf_cfg)
    assert normalized_config_values(lk_cfg) == normalized_config_values(pf_cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_lorakit_file_loads_in_peft_with_identical_outputs(arch, tmp_path):
    lk = _saved_by(lorakit, arch, tmp_path)
    pf = load(peft, arch, tmp_path)
    lk_out = outputs(lk, arch)
    assert_outputs_differ(lk_out, outputs(base_model(arch), arch), "lorakit adapter vs base")
    assert_same_outputs(outputs(pf, arch), lk_out, "PEFT loading lorakit's file")


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_file_loads_in_lorakit_with_identical_outputs(arch, tmp_path):
    pf = _saved_by(peft, arch, tmp_path)
    lk = load(lorakit, arch, tmp_path)
    pf_out = outputs(pf, arch)
    assert_outputs_differ(pf_out, outputs(base_model(arch), arch), "PEFT adapter vs base")
    assert_same_outputs(outputs(lk, arch), pf_out, "lorakit loading PEFT's file")


@pytest.mark.parametrize("arch", ARCHS)
def test_loaded_adapter_is_frozen_unless_is_trainable_like_peft(arch, tmp_path):
    _saved_by(peft, arch, tmp_path)
    assert (
        trainable_names(load(lorakit, arch, tmp_path)) == trainable_names(load(peft, arch, tmp_path)) == set()
    )
    expected = trainable_names(load(peft, arch, tmp_path, is_trainable=True))
    assert expected
    assert trainable_names(load(lorakit, arch, tmp_path, is_trainable=True)) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_matches_unmerged_outputs_of_both_libraries(arch, tmp_path):
    lk = _saved_by(lorakit, arch, tmp_path)
    pf = load(peft, arch, tmp_path)
    unmerged = outputs(lk, arch)
    assert_same_outputs(outputs(pf, arch), unmerged, "PEFT unmerged vs lorakit unmerged")
    lk_merged = lk.merge_and_unload()
    pf_merged = pf.merge_and_unload()
    assert type(lk_merged) is type(pf_merged)
    assert set(lk_merged.state_dict()) == set(pf_merged.state_dict()) == set(base_model(arch).state_dict())
    assert_same_outputs(outputs(lk_merged, arch), unmerged, "lorakit merged vs unmerged")
    assert_same_outputs(outputs(pf_merged, arch), unmerged, "PEFT merged vs lorakit unmerged")


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_adapter_then_unmerge_adapter_keeps_outputs(arch):
    lk = wrap(lorakit, arch, **ARCH_LORA_KWARGS[arch])
    perturb_adapters(lk)
    before = outputs(lk, arch)
    lk.merge_adapter()
    assert_same_outputs(outputs(lk, arch), before, "after merge_adapter")
    lk.unmerge_adapter()
    assert_same_outputs(outputs(lk, arch), before, "after unmerge_adapter")


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_gives_base_model_outputs(arch, tmp_path):
    lk = _saved_by(lorakit, arch, tmp_path)
    pf = load(peft, arch, tmp_path)
    base_out = outputs(base_model(arch), arch)
    adapted = outputs(lk, arch)
    assert_outputs_differ(adapted, base_out, "adapter vs base")
    with lk.disable_adapter():
        assert_same_outputs(outputs(lk, arch), base_out, "lorakit inside disable_adapter()")
    with pf.disable_adapter():
        assert_same_outputs(outputs(pf, arch), base_out, "PEFT inside disable_adapter()")
    assert_same_outputs(outputs(lk, arch), adapted, "lorakit after leaving disable_adapter()")


@pytest.mark.parametrize("arch", ARCHS)
def test_unload_drops_lora_without_merging_like_peft(arch, tmp_path):
    lk = _saved_by(lorakit, arch, tmp_path)
    pf = load(peft, arch, tmp_path)
    has_modules_to_save = any(".modules_to_save." in n for n, _ in pf.named_parameters())
    lk_base, pf_base = lk.unload(), pf.unload()
    expected = base_model(arch)
    assert type(lk_base) is type(pf_base) is type(expected)
    assert set(lk_base.state_dict()) == set(pf_base.state_dict()) == set(expected.state_dict())
    # lorakit's unload() always gives the model back as it was. PEFT's keeps the trained
    # modules_to_save copy in place (a documented difference, see README "Differences from PEFT").
    assert_same_outputs(outputs(lk_base, arch), outputs(expected, arch), "unload() vs base model")
    if has_modules_to_save:
        assert_outputs_differ(
            outputs(pf_base, arch), outputs(expected, arch), "PEFT unload() keeps the trained head"
        )
    else:
        assert_same_outputs(
            outputs(lk_base, arch), outputs(pf_base, arch), "lorakit unload() vs PEFT unload()"
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_one_optimizer_step_trains_the_same_parameters_as_peft(arch, tmp_path):
    """A real training step (not noise) produces a file PEFT reads back to lorakit's outputs."""
    lk = wrap(lorakit, arch, **ARCH_LORA_KWARGS[arch])
    perturb_adapters(lk, seed=3)  # lora_B starts at zero; give the gradient somewhere to go
    lk.train()
    before = {n: p.detach().clone() for n, p in lk.named_parameters()}
    opt = torch.optim.SGD([p for p in lk.parameters() if p.requires_grad], lr=0.5)
    out = lk(**model_inputs(arch))
    loss = (out if isinstance(out, torch.Tensor) else out.logits).float().pow(2).mean()
    loss.backward()
    opt.step()
    changed = {n for n, p in lk.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed
    assert changed <= trainable_names(wrap(peft, arch, **ARCH_LORA_KWARGS[arch]))
    lk.eval()
    lk.save_pretrained(tmp_path)
    assert_same_outputs(outputs(load(peft, arch, tmp_path), arch), outputs(lk, arch), "PEFT after a step")


def test_non_default_adapter_name_saves_in_a_subfolder_like_peft(tmp_path):
    arch = "llama"
    cfg = ARCH_LORA_KWARGS[arch]
    lk = lorakit.get_peft_model(
        base_model(arch), lora_config(lorakit, "CAUSAL_LM", **cfg), adapter_name="mine"
    )
    pf = peft.get_peft_model(base_model(arch), lora_config(peft, "CAUSAL_LM", **cfg), adapter_name="mine")
    lk.save_pretrained(tmp_path / "lk")
    pf.save_pretrained(tmp_path / "pf")
    expected = adapter_files(tmp_path / "pf")
    assert expected == {
        os.path.join("mine", "adapter_config.json"),
        os.path.join("mine", "adapter_model.safetensors"),
    }
    assert adapter_files(tmp_path / "lk") == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_print_trainable_parameters_prints_what_peft_prints(arch, capsys):
    lk, pf = _both(arch)
    pf.print_trainable_parameters()
    expected = capsys.readouterr().out
    assert "trainable params" in expected
    lk.print_trainable_parameters()
    assert capsys.readouterr().out == expected


def test_pickle_serialization_writes_a_bin_file_peft_loads(tmp_path):
    arch = "llama"
    lk = wrap(lorakit, arch, **ARCH_LORA_KWARGS[arch])
    perturb_adapters(lk)
    lk.save_pretrained(tmp_path / "lk", safe_serialization=False)
    peft_model = wrap(peft, arch, **ARCH_LORA_KWARGS[arch])
    peft_model.save_pretrained(tmp_path / "pf", safe_serialization=False)
    expected = adapter_files(tmp_path / "pf")
    assert expected == {"adapter_config.json", "adapter_model.bin"}
    assert adapter_files(tmp_path / "lk") == expected
    lk_keys = set(torch.load(tmp_path / "lk" / "adapter_model.bin", weights_only=True))
    assert lk_keys == set(torch.load(tmp_path / "pf" / "adapter_model.bin", weights_only=True))
    assert_same_outputs(
        outputs(load(peft, arch, tmp_path / "lk"), arch), outputs(lk, arch), "PEFT loading .bin"
    )
