"""layer_replication against PEFT 0.21.2: same files, same outputs; PEFT's merge is wrong, ours is not."""

import copy

import pytest
import torch

import lorakit
from tests.helpers import randomize_adapters, tiny_llama

peft = pytest.importorskip("peft")


def test_replicated_adapters_load_both_ways_and_only_pefts_merge_drifts(tmp_path):
    base = tiny_llama(layers=4)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    config = {"r": 2, "target_modules": ["q_proj", "v_proj"], "layer_replication": [[0, 4], [2, 4]]}
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    randomize_adapters(ours)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected)
        torch.testing.assert_close(back(input_ids=ids).logits, expected)
        pefts_merge = theirs.merge_and_unload()(input_ids=ids).logits
        our_merge = back.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(our_merge, expected, atol=1e-5, rtol=1e-5)
    assert (pefts_merge - expected).abs().max() > 1e-2  # PEFT merges every copy into the shared weight
