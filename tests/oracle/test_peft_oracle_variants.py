"""PiSSA / OLoRA adapters against PEFT 0.21.2: plain files (the init re-runs on load) and converted
files (plain LoRA of rank 2r on the untouched base) load both ways with the same outputs."""

import copy

import pytest
import torch

import lorakit
from tests.helpers import tiny_llama

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def step(model):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_mutated_init_files_and_their_conversion_load_both_ways(init, rslora, tmp_path):
    base = tiny_llama()
    kwargs = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": init}
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(use_rslora=rslora, **kwargs))
    ours.save_pretrained(tmp_path / "initial")
    expected = logits(step(ours))
    ours.save_pretrained(tmp_path / "plain")
    ours.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial"
    )
    for folder in ("plain", "converted"):  # plain: PEFT re-runs the init on the untouched base
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / folder).eval()
        torch.testing.assert_close(logits(in_peft), expected, atol=1e-4, rtol=1e-4, msg=folder)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_rslora=rslora, **kwargs))
    theirs.save_pretrained(tmp_path / "theirs_initial")
    theirs_out = logits(step(theirs))
    theirs.save_pretrained(
        tmp_path / "theirs_converted",
        path_initial_model_for_weight_conversion=str(tmp_path / "theirs_initial"),
    )
    loaded = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs_converted")
    torch.testing.assert_close(logits(loaded), theirs_out, atol=1e-4, rtol=1e-4)
