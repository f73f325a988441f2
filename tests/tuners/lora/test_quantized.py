"""LoRA/DoRA on quantized bases (bitsandbytes 4-bit/8-bit on CPU, lorakit NF4): outputs against the
definition with the dequantized weight, merging requantizes, unload returns the quantized modules,
files round-trip, LoftQ on a real 4-bit base, QLoRA without bitsandbytes."""

import warnings

import pytest
import torch
from torch.nn import functional as F
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, get_peft_model
from lorakit.tuners.lora.quantized import QuantizedLinear
from tests.quantized_helpers import CONFIG, load_quantized, train_losses

bnb = pytest.importorskip("bitsandbytes")


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def q_proj(peft_model) -> QuantizedLinear:
    return peft_model.base_model.model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_all_linear_wraps_quantized_layers_and_leaves_lm_head(saved_llama, kind):
    model = load_quantized(saved_llama, kind)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {n for n, m in peft_model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(wrapped) == 2 * 7
    assert not any("lm_head" in n for n in wrapped)
    assert not q_proj(peft_model)._plain_base()


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_layer_output_is_quantized_base_plus_adapter_formula(saved_llama, kind, use_dora):
    model = load_quantized(saved_llama, kind)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=use_dora, init_lora_weights=False),
    )
    layer = q_proj(peft_model)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = layer.base_layer(x)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        lora = 2.0 * (x @ a.t() @ b.t())
        if use_dora:
            weight = layer.dequantized_weight()
            norm = (weight + 2.0 * b @ a).norm(dim=1)
            factor = layer.lora_magnitude_vector["default"].weight / norm
            expected = factor * (base_out + lora) + (factor - 1) * 0  # base bias is None in Llama
        else:
            expected = base_out + lora
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dequantized_weight_reproduces_base_layer_output(saved_llama, kind):
    layer = q_proj(
        get_peft_model(load_quantized(saved_llama, kind), LoraConfig(r=2, target_modules=["q_proj"]))
    )
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            F.linear(x, layer.dequantized_weight()), layer.base_layer(x), atol=2e-2, rtol=2e-2
        )


def test_dequantized_weight_survives_bnb_cpu_repacking(saved_llama):
    layer = q_proj(
        get_peft_model(load_quantized(saved_llama, "nf4"), LoraConfig(r=2, target_modules=["q_proj"]))
    )
    before = layer.dequantized_weight()
    layer.eval()
    with torch.no_grad():  # on AVX512-BF16 CPUs this repacks the codes into another layout
        layer(torch.randn(2, 64))
    torch.testing.assert_close(layer.dequantized_weight(), before, atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unload_requantizes_into_same_type_and_warns(saved_llama, kind, use_dora):
    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_quantized(saved_llama, kind),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=use_dora),
    )
    with torch.no_grad():  # a trained-sized change (smaller than W), so W + delta keeps W's scale
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    layer = q_proj(peft_model)
    unmerged = logits(peft_model)
    with torch.no_grad():  # after the inference forward, which may repack bnb's CPU 4-bit codes
        target = layer.dequantized_weight() + layer.get_delta_weight("default")
    with pytest.warns(UserWarning, match="requantizes"):
        merged_model = peft_model.merge_and_unload(safe_merge=True)
    merged_layer = merged_model.model.layers[0].self_attn.q_proj
    assert type(merged_layer) is type(layer.base_layer)
    if kind == "nf4":  # the merged codes are exactly bnb's quantization of W + delta
        codes, state = bnb.functional.quantize_4bit(target, quant_type="nf4", blocksize=64)
        expected = bnb.functional.dequantize_4bit(codes, state)
    else:
        expected = bnb.functional.int8_vectorwise_dequant(
            *bnb.functional.int8_vectorwise_quant(target.half())[:2]
        )
    weight = merged_layer.weight
    if kind == "nf4":
        actual = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    else:
        actual = bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)
    torch.testing.assert_close(actual, expected.float(), atol=1e-6, rtol=0)
    # the new rounding is of the size of the base's own quantization error, not larger
    full = LlamaForCausalLM.from_pretrained(saved_llama).eval()
    quantization_error = (logits(full) - logits(load_quantized(saved_llama, kind))).abs().max()
    assert (unmerged - logits(merged_model)).abs().max() < 2 * quantization_error


def test_merge_then_unmerge_adapter_restores_output_within_rounding(saved_llama):
    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_quantized(saved_llama, "int8"),
        LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    before = logits(peft_model)
    with pytest.warns(UserWarning):
        peft_model.merge_adapter()
    merged = logits(peft_model)
    peft_model.unmerge_adapter()
    after = logits(peft_model)
    scale = before.abs().max()
    assert (merged - before).abs().max() < 0.05 * scale
    assert (after - before).abs().max() < 0.05 * scale
    assert not q_proj(peft_model).merged


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_unload_returns_the_original_quantized_modules(saved_llama, kind):
    model = load_quantized(saved_llama, kind)
    original = model.model.layers[1].mlp.down_proj
    expected = logits(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    unloaded = peft_model.unload()
    assert unloaded.model.layers[1].mlp.down_proj is original
    torch.testing.assert_close(logits(unloaded), expected)


def test_adapters_save_and_load_on_4bit_base_with_same_outputs(saved_llama, tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(load_quantized(saved_llama, "nf4"), config)
    peft_model.add_adapter(
        "second", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path)
    expected = {name: (peft_model.set_adapter(name), logits(peft_model))[1] for name in ("default", "second")}
    loaded = lorakit.PeftModel.from_pretrained(load_quantized(saved_llama, "nf4"), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    for name, want in expected.items():
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded), want)


def test_training_step_changes_only_adapters_on_4bit_base(saved_llama):
    peft_model = get_peft_model(
        load_quantized(saved_llama, "nf4"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1)
    )
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    codes = q_proj(peft_model).base_layer.weight.data.clone()
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = peft_model(input_ids=ids(), labels=ids()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(q_proj(peft_model).base_layer.weight.data, codes)


def test_data_driven_init_on_quantized_base_names_replace_lora_weights_loftq(saved_llama):
    with pytest.raises(ValueError, match="replace_lora_weights_loftq"):
        get_peft_model(
            load_quantized(saved_llama, "nf4"),
            LoraConfig(
                r=4,
                target_modules=["q_proj"],
                init_lora_weights="loftq",
                loftq_config=lorakit.LoftQConfig(loftq_bits=4),
            ),
        )


def test_lora_bias_on_quantized_base_is_refused(saved_llama):
    with pytest.raises(ValueError, match="lora_bias"):
        get_peft_model(
            load_quantized(saved_llama, "int8"), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True)
        )


def test_replace_lora_weights_loftq_brings_4bit_model_closer_to_full_precision(saved_llama):
    full = LlamaForCausalLM.from_pretrained(saved_llama).eval()
    reference = logits(full)
    config = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear")
    plain = get_peft_model(load_quantized(saved_llama, "nf4"), config)
    loftq = get_peft_model(load_quantized(saved_llama, "nf4"), config)
    assert lorakit.replace_lora_weights_loftq(loftq) == 14  # from config._name_or_path
    again = get_peft_model(load_quantized(saved_llama, "nf4"), config)
    lorakit.replace_lora_weights_loftq(again, model_path=f"{saved_llama}/model.safetensors")
    torch.testing.assert_close(logits(again), logits(loftq))
    plain_error = (logits(plain) - reference).pow(2).mean()
    loftq_error = (logits(loftq) - reference).pow(2).mean()
    assert loftq_error < 0.8 * plain_error
    layer, full_weight = q_proj(loftq), full.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        adapted = layer.dequantized_weight() + layer.get_delta_weight("default")
        assert (adapted - full_weight).norm() < (layer.dequantized_weight() - full_weight).norm()


def test_replace_lora_weights_loftq_without_checkpoint_names_model_path(saved_llama, tmp_path):
    peft_model = get_peft_model(
        load_quantized(saved_llama, "nf4"), LoraConfig(r=4, target_modules=["q_proj"])
    )
    with pytest.raises(ValueError, match="model_path"):
        lorakit.replace_lora_weights_loftq(peft_model, model_path=str(tmp_path))


def small_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def test_quantize_model_nf4_keeps_lm_head_and_matches_dequantized_linear():
    model = small_llama()
    original = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    lorakit.quantize_model_nf4(model)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, lorakit.NF4Linear) and type(model.lm_head) is torch.nn.Linear
    assert model.is_quantized and not any(p.requires_grad for p in layer.parameters())
    assert not any(name.endswith("weight") for name, _ in layer.named_parameters())
    weight = layer.dequantized_weight()
    expected = lorakit.quant.dequantize(lorakit.quant.quantize(original, bits=4, method="nf", block_size=64))
    torch.testing.assert_close(weight, expected, atol=0, rtol=0)
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ weight.t())


def test_lora_on_nf4_model_trains_base_frozen_and_outputs_follow_formula():
    model = lorakit.quantize_model_nf4(small_llama())
    lorakit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    layer = q_proj(peft_model)
    codes = layer.base_layer.codes.clone()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=ids(), labels=ids()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.base_layer.codes, codes)
    x = torch.randn(3, 64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t() + 2.0 * x @ a.t() @ b.t())
    with pytest.warns(UserWarning, match="requantizes"):
        merged = peft_model.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, lorakit.NF4Linear)


def test_seed_001_gptj_8bit_snippet_trains(tmp_path):
    """Seed article 001: GPT-J loaded with load_in_8bit, prepare_model_for_kbit_training, get_peft_model."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    config = GPTJConfig(n_embd=64, n_head=4, rotary_dim=8, n_layer=2, n_positions=64, vocab_size=128)
    GPTJForCausalLM(config).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPTJForCausalLM.from_pretrained(
            tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
        )
    model = lorakit.prepare_model_for_kbit_training(model)
    lora_config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out", "wte"],
        lora_dropout=0.1,
        bias="none",
        task_type="CAUSAL_LM",
    )
    lora_model = get_peft_model(model, lora_config)
    assert isinstance(
        lora_model.base_model.model.transformer.h[0].mlp.fc_in, lorakit.tuners.lora.quantized.Linear8bitLt
    )
    assert model.is_gradient_checkpointing
    lora_model.train()
    losses = train_losses(lora_model, ids)
    assert losses[-1] < losses[0]


def test_lorakit_works_without_importing_bitsandbytes():
    import subprocess
    import sys

    code = (
        "import sys, torch, lorakit\n"
        "model = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
        "lorakit.get_peft_model(model, lorakit.LoraConfig(r=2, target_modules=['0']))\n"
        "lorakit.get_peft_model(lorakit.quantize_model_nf4(torch.nn.Sequential(torch.nn.Linear(64, 8))),"
        " lorakit.LoraConfig(r=2, target_modules=['0']))\n"
        "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
