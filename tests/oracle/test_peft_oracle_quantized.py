"""Quantized bases against PEFT 0.21.2 + bitsandbytes: two copies of the same 4-bit/8-bit model,
the same LoRA/DoRA weights, the same outputs; files load both ways; prepare_model_for_kbit_training
changes the same things."""

import pytest
import torch

import lorakit

from ..quantized_helpers import load_quantized

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

ATOL = 1e-5


def logits(model, training: bool = True) -> torch.Tensor:
    """Logits in train mode by default (dropout is 0): an inference forward makes bitsandbytes
    repack 4-bit codes for AVX512-BF16 CPUs, and PEFT 0.21.2's DoRA then dequantizes the repacked
    codes as if they were not (weights off by ~0.1); lorakit unpacks them first (see
    tests/tuners/lora/test_quantized.py::test_dequantized_weight_survives_bnb_cpu_repacking)."""
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    model.train(training)
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def copy_adapters(source, target) -> None:
    """Give `target` the adapter tensors of `source`, by (identical) parameter name."""
    wanted = adapter_state(source)
    got = dict(target.named_parameters())
    assert set(wanted) == {n for n in got if "lora_" in n}
    with torch.no_grad():
        for name, tensor in wanted.items():
            got[name].copy_(tensor)


def pair(path: str, kind: str, adapters: dict[str, dict]):
    """(lorakit model, PEFT model) on two loads of the same quantized checkpoint, same adapters."""
    models = []
    for lib in (lorakit, peft):
        model = None
        for name, options in adapters.items():
            config = lib.LoraConfig(init_lora_weights=False, **options)
            if model is None:
                torch.manual_seed(0)
                model = lib.get_peft_model(load_quantized(path, kind), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
        models.append(model)
    ours, theirs = models
    copy_adapters(ours, theirs)
    return ours, theirs


TWO = {
    "first": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "second": dict(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]),
}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_on_quantized_base_matches_peft(saved_llama, kind, use_dora):
    ours, theirs = pair(
        saved_llama,
        kind,
        {"default": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora)},
    )
    torch.testing.assert_close(logits(ours), logits(theirs), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_two_adapters_on_quantized_base_match_peft(saved_llama, kind):
    ours, theirs = pair(saved_llama, kind, TWO)
    for name in TWO:
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(ours), logits(theirs), atol=ATOL, rtol=ATOL)
    ours.base_model.set_adapter(["first", "second"])
    theirs.base_model.set_adapter(["first", "second"])
    torch.testing.assert_close(logits(ours), logits(theirs), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_files_on_4bit_base_load_both_ways(saved_llama, tmp_path, use_dora):
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=use_dora)
    ours, theirs = pair(saved_llama, "nf4", {"default": options})
    expected = logits(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(load_quantized(saved_llama, "nf4"), tmp_path / "ours")
    in_ours = lorakit.PeftModel.from_pretrained(load_quantized(saved_llama, "nf4"), tmp_path / "theirs")
    torch.testing.assert_close(logits(in_peft), expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(logits(in_ours), expected, atol=ATOL, rtol=ATOL)


def kbit_state(model) -> dict:
    return {
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "checkpointing": model.is_gradient_checkpointing,
        "input_grads": model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad,
    }


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("use_gradient_checkpointing", [True, False])
def test_prepare_model_for_kbit_training_changes_what_peft_changes(
    saved_llama, kind, use_gradient_checkpointing
):
    ours = load_quantized(saved_llama, kind, dtype=torch.bfloat16)
    theirs = load_quantized(saved_llama, kind, dtype=torch.bfloat16)
    assert any(p.dtype == torch.bfloat16 for p in ours.parameters())  # something to upcast
    before = kbit_state(ours)
    lorakit.prepare_model_for_kbit_training(ours, use_gradient_checkpointing=use_gradient_checkpointing)
    peft.prepare_model_for_kbit_training(
        theirs,
        use_gradient_checkpointing=use_gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    after = kbit_state(ours)
    assert after == kbit_state(theirs)
    assert after != before
