"""The examples run and their checks pass: examples/quickstart.py with a short training run."""

from __future__ import annotations

import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.helpers import REPO_ROOT  # noqa: E402

EXAMPLES = REPO_ROOT / "examples"
N_LAYERS, HIDDEN, R, N_LABELS = 6, 384, 8, 3


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """Runs the quickstart (8 steps) into a temporary folder; returns (returned summary, out dir)."""
    out = tmp_path_factory.mktemp("quickstart")
    summary = load_example("quickstart").main(["--out", str(out), "--steps", "8", "--lr", "5e-3"])
    return summary, out


def test_quickstart_writes_adapter_and_summary(quickstart):
    summary, out = quickstart
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(summary["adapter_files"])


def test_quickstart_checks_pass(quickstart):
    summary, _ = quickstart
    assert summary["ok"] is True
    assert summary["reload_ok"] and summary["merge_ok"] and summary["loss_fell"]
    assert summary["reload_max_abs_diff"] <= 1e-5
    assert summary["merge_max_abs_diff"] <= 1e-4
    assert summary["lora_modules_after_merge"] == 0
    assert summary["merged_model_class"] == "BertForSequenceClassification"


def test_quickstart_training_learns(quickstart):
    summary, _ = quickstart
    assert summary["steps"] == 8
    assert summary["loss_before"] > 0.9  # ~ln(3): a fresh 3-way head
    assert summary["loss_after"] < 0.5 * summary["loss_before"]
    assert summary["train_accuracy_after"] >= 0.8


def test_quickstart_trainable_parameters(quickstart):
    summary, _ = quickstart
    lora = N_LAYERS * 2 * (R * HIDDEN + HIDDEN * R)  # query and value in 6 layers
    head = HIDDEN * N_LABELS + N_LABELS  # the classifier, trained in full (modules_to_save)
    assert summary["trainable_params"] == lora + head
    assert 0.2 < summary["trainable_percent"] < 0.5


def test_quickstart_adapter_is_in_peft_format(quickstart):
    _, out = quickstart
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "SEQ_CLS"
    assert (config["r"], config["lora_alpha"]) == (R, 16)
    assert set(config["target_modules"]) == {"query", "value"}
    assert "classifier" in config["modules_to_save"]

    tensors = load_file(out / "adapter_model.safetensors")
    prefix = "base_model.model.bert.encoder.layer"
    expected = {
        f"{prefix}.{i}.attention.self.{m}.lora_{ab}.weight"
        for i in range(N_LAYERS)
        for m in ("query", "value")
        for ab in "AB"
    }
    expected |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(tensors) == expected
    assert tuple(tensors[f"{prefix}.0.attention.self.query.lora_A.weight"].shape) == (R, HIDDEN)
    assert tuple(tensors[f"{prefix}.0.attention.self.query.lora_B.weight"].shape) == (HIDDEN, R)
    assert tuple(tensors["base_model.model.classifier.weight"].shape) == (N_LABELS, HIDDEN)
