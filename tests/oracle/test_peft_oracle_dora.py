"""DoRA against PEFT 0.21.2 on the same weights: outputs (eval and train with dropout), gradients,
files both ways, merged outputs."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit

peft = pytest.importorskip("peft")


class Net(nn.Module):
    """Every layer type DoRA supports, in one forward."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lin = nn.Linear(6, 6)
        self.c1d = Conv1D(6, 6)
        self.conv = nn.Conv1d(6, 4, 3, padding=1)

    def forward(self, ids):
        hidden = self.c1d(self.lin(self.emb(ids)))
        return self.conv(hidden.transpose(1, 2))


def pair(dropout: float):
    torch.manual_seed(0)
    base = Net()
    models = {}
    for lib in (lorakit, peft):
        config = lib.LoraConfig(
            r=2,
            target_modules=["emb", "lin", "c1d", "conv"],
            use_dora=True,
            lora_dropout=dropout,
            init_lora_weights=False,
        )
        models[lib.__name__] = lib.get_peft_model(copy.deepcopy(base), config)
    ours = dict(models["lorakit"].named_parameters())
    with torch.no_grad():
        for name, param in models["peft"].named_parameters():
            if param.requires_grad:
                param.copy_(ours[name])
    return base, models["lorakit"], models["peft"]


IDS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dora_outputs_and_gradients_equal_pefts(dropout, mode):
    _, ours, theirs = pair(dropout)
    outputs = []
    for model in (ours, theirs):
        getattr(model, mode)()
        torch.manual_seed(5)  # same dropout masks: both draw one mask per adapted input
        out = model(IDS)
        out.square().mean().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, theirs_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    magnitude_grads = [p.grad for n, p in ours.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitude_grads) == 4 and all(g.abs().sum() > 0 for g in magnitude_grads)


def test_dora_files_load_both_ways_and_merge_like_pefts(tmp_path):
    base, ours, theirs = pair(0.0)
    ours.eval()
    with torch.no_grad():
        reference = ours(IDS)
        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        in_ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
        torch.testing.assert_close(in_peft(IDS), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(in_ours(IDS), reference, atol=1e-5, rtol=1e-5)
        merged_theirs = in_peft.merge_and_unload()(IDS)
        merged_ours = in_ours.merge_and_unload()(IDS)
    torch.testing.assert_close(merged_ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_ours, merged_theirs, atol=1e-5, rtol=1e-5)
