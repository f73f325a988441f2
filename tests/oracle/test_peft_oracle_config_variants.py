"""LoraConfig variants on the tiny Llama, each checked against PEFT.

Every variant must give PEFT's targeted modules, trainable parameters, saved keys/shapes and
config, and identical outputs when either library loads the other's file.
"""

import peft
import pytest

from .oracle_helpers import (
    assert_outputs_differ,
    assert_same_outputs,
    base_model,
    load,
    lorakit,
    normalized_config_values,
    outputs,
    perturb_adapters,
    saved_config,
    saved_shapes,
    targeted_module_names,
    trainable_names,
    wrap,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARCH = "llama"
QV = ["q_proj", "v_proj"]
VARIANTS = {
    "bias_all": dict(r=4, lora_alpha=8, target_modules=QV, bias="all"),
    "bias_lora_only": dict(r=4, lora_alpha=8, target_modules=QV, bias="lora_only"),
    "use_rslora": dict(r=4, lora_alpha=16, target_modules=QV, use_rslora=True),
    "rank_and_alpha_pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj"],
        rank_pattern={r"^model\.layers\.1\..*q_proj": 6, "v_proj": 2},
        alpha_pattern={"k_proj": 3, r"model\.layers\.0\.self_attn\.q_proj": 20},
    ),
    "layers_to_transform_with_pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
    ),
    "layers_to_transform_int": dict(r=4, lora_alpha=8, target_modules=QV, layers_to_transform=0),
    "lora_bias": dict(r=4, lora_alpha=8, target_modules=QV, lora_bias=True),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "regex_target_modules": dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|down_proj)$"),
    "exclude_modules_list": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj"],
        exclude_modules=["model.layers.0.self_attn.k_proj"],
    ),
    "exclude_modules_regex": dict(
        r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=r".*\.mlp\..*"
    ),
    "embedding_target": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "default_target_modules": dict(r=4, lora_alpha=8),
    "modules_to_save_lm_head": dict(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["lm_head"]),
    "lora_dropout": dict(r=4, lora_alpha=8, target_modules=QV, lora_dropout=0.1),
}
VARIANT_IDS = list(VARIANTS)


def _both(variant):
    kwargs = VARIANTS[variant]
    return wrap(lorakit, ARCH, **kwargs), wrap(peft, ARCH, **kwargs)


def _saved_by(lib, variant, directory):
    model = wrap(lib, ARCH, **VARIANTS[variant])
    perturb_adapters(model, seed=7)
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_variant_targets_the_same_modules_as_peft(variant):
    lk, pf = _both(variant)
    expected = targeted_module_names(pf)
    assert expected
    assert targeted_module_names(lk) == expected


@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_variant_trainable_parameters_match_peft(variant):
    lk, pf = _both(variant)
    assert trainable_names(lk) == trainable_names(pf)
    assert tuple(lk.get_nb_trainable_parameters()) == tuple(pf.get_nb_trainable_parameters())


@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_variant_saved_keys_shapes_and_config_match_peft(variant, tmp_path):
    lk, pf = _both(variant)
    lk.save_pretrained(tmp_path / "lk")
    pf.save_pretrained(tmp_path / "pf")
    assert saved_shapes(tmp_path / "lk") == saved_shapes(tmp_path / "pf")
    lk_cfg, pf_cfg = saved_config(tmp_path / "lk"), saved_config(tmp_path / "pf")
    assert set(lk_cfg) == set(pf_cfg)
    assert normalized_config_values(lk_cfg) == normalized_config_values(pf_cfg)


@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_variant_lorakit_file_loads_in_peft_with_identical_outputs(variant, tmp_path):
    lk = _saved_by(lorakit, variant, tmp_path)
    lk_out = outputs(lk, ARCH)
    assert_outputs_differ(lk_out, outputs(base_model(ARCH), ARCH), "adapter vs base")
    assert_same_outputs(
        outputs(load(peft, ARCH, tmp_path), ARCH), lk_out, f"PEFT loading lorakit's {variant}"
    )


@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_variant_peft_file_loads_in_lorakit_with_identical_outputs(variant, tmp_path):
    pf = _saved_by(peft, variant, tmp_path)
    pf_out = outputs(pf, ARCH)
    assert_outputs_differ(pf_out, outputs(base_model(ARCH), ARCH), "adapter vs base")
    assert_same_outputs(
        outputs(load(lorakit, ARCH, tmp_path), ARCH), pf_out, f"lorakit loading PEFT's {variant}"
    )


@pytest.mark.parametrize("variant", VARIANT_IDS)
def test_variant_merge_and_unload_matches_peft(variant, tmp_path):
    lk = _saved_by(lorakit, variant, tmp_path)
    pf = load(peft, ARCH, tmp_path)
    unmerged = outputs(lk, ARCH)
    assert_same_outputs(outputs(lk.merge_and_unload(), ARCH), unmerged, "lorakit merged vs unmerged")
    assert_same_outputs(outputs(pf.merge_and_unload(), ARCH), unmerged, "PEFT merged vs lorakit unmerged")


def test_bias_all_and_lora_only_save_different_bias_sets_like_peft(tmp_path):
    keys = {}
    for bias in ("none", "lora_only", "all"):
        for name, lib in (("lk", lorakit), ("pf", peft)):
            model = wrap(lib, ARCH, r=4, lora_alpha=8, target_modules=QV, bias=bias)
            model.save_pretrained(tmp_path / f"{name}_{bias}")
            keys[name, bias] = set(saved_shapes(tmp_path / f"{name}_{bias}"))
    for bias in ("none", "lora_only", "all"):
        assert keys["lk", bias] == keys["pf", bias], bias
    # the oracle itself distinguishes the three settings on this model (attention_bias=True)
    assert keys["pf", "none"] < keys["pf", "lora_only"] < keys["pf", "all"]


def test_embedding_target_saves_base_embedding_weight_like_peft(tmp_path):
    lk, pf = _both("embedding_target")
    lk.save_pretrained(tmp_path / "lk")
    pf.save_pretrained(tmp_path / "pf")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in saved_shapes(tmp_path / "pf")
    assert key in saved_shapes(tmp_path / "lk")
    lk_names = {n for n, _ in lk.named_parameters()}
    assert "base_model.model.model.embed_tokens.lora_embedding_A.default" in lk_names
    assert "base_model.model.model.embed_tokens.lora_embedding_B.default" in lk_names


def test_all_linear_targets_every_linear_but_the_output_head_like_peft():
    lk, pf = _both("all_linear")
    expected = targeted_module_names(pf)
    assert "lm_head" not in expected
    assert len(expected) == 14  # 7 linears x 2 layers
    assert targeted_module_names(lk) == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_default_target_modules_per_architecture_match_peft(arch, tmp_path):
    """target_modules=None: each architecture's default targets (and GPT-2's fan_in_fan_out flip)."""
    lk, pf = wrap(lorakit, arch, r=4, lora_alpha=8), wrap(peft, arch, r=4, lora_alpha=8)
    expected = targeted_module_names(pf)
    assert expected
    assert targeted_module_names(lk) == expected
    lk.save_pretrained(tmp_path / "lk")
    pf.save_pretrained(tmp_path / "pf")
    assert normalized_config_values(saved_config(tmp_path / "lk")) == normalized_config_values(
        saved_config(tmp_path / "pf")
    )
    assert saved_shapes(tmp_path / "lk") == saved_shapes(tmp_path / "pf")


def test_default_target_modules_on_gpt2_load_in_peft_with_identical_outputs(tmp_path):
    """Conv1D with fan_in_fan_out left False: PEFT flips it to True; lorakit's file must agree."""
    lk = wrap(lorakit, "gpt2", r=4, lora_alpha=8)
    perturb_adapters(lk)
    lk.save_pretrained(tmp_path)
    assert saved_config(tmp_path)["fan_in_fan_out"] is True
    assert_same_outputs(outputs(load(peft, "gpt2", tmp_path), "gpt2"), outputs(lk, "gpt2"), "gpt2 defaults")
