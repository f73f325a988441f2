"""`lorakit.training.train`: the quickstart, SFT masking and learning, DPO, checkpoints and options."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import PeftModel
from lorakit.training.data import IGNORE_INDEX, DpoCollator, dpo_examples, sft_examples
from lorakit.training.dpo import pair_logprobs, reference_logprobs
from lorakit.training.recipe import RecipeError, load_recipe
from lorakit.training.run import RECIPE_FILE, load_tokenizer, train
from lorakit.training.trainer import STAGING_FOLDER, LoraPlusTrainer
from tests.helpers import tiny_bert_recipe

# Small, fast runs of the shipped recipes: no eval set unless a test needs one.
FAST = {"disable_tqdm": True, "logging_steps": 1}


def adapter_tensors(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(a, b, atol=0.0):
    left, right = adapter_tensors(a), adapter_tensors(b)
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The shipped quickstart, exactly as `lorakit train` runs it (only the output folder moved)."""
    out = tmp_path_factory.mktemp("quickstart")
    return out, train(None, overrides={"output_dir": str(out), "disable_tqdm": True})


def test_quickstart_beats_the_untrained_model_by_a_clear_margin(quickstart):
    out, result = quickstart
    # Six intents: the untrained head is near chance (1/6); measured 0.26 -> 1.00 on 120 test sentences.
    assert result.before["accuracy"] < 0.4
    assert result.after["accuracy"] >= 0.85
    assert result.after["accuracy"] - result.before["accuracy"] >= 0.5
    assert result.after["loss"] < result.before["loss"] / 4
    assert result.trainable_params / result.all_params < 0.02


def test_quickstart_writes_adapter_metrics_curve_and_summary(quickstart):
    out, result = quickstart
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png", RECIPE_FILE} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 10 and losses[-1] < losses[0] / 4
    steps = [m["step"] for m in metrics]
    assert steps == sorted(steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"] == pytest.approx(result.after) and summary["steps"] == result.steps
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["r"] == 8


def test_checkpoints_hold_the_adapter_only_and_no_staging_folder_is_left(quickstart):
    out, _ = quickstart
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints and not (out / STAGING_FOLDER).exists()
    for checkpoint in checkpoints:
        names = {p.name for p in checkpoint.iterdir()}
        assert {
            "adapter_model.safetensors",
            "adapter_config.json",
            "optimizer.pt",
            "trainer_state.json",
        } <= names
        assert not names & {"model.safetensors", "pytorch_model.bin"}


def test_sft_labels_mask_the_prompt_and_keep_the_completion():
    recipe = load_recipe("sft")
    tokenizer = load_tokenizer(recipe)
    rows = [
        {"prompt": "Opposite of hot:", "completion": " cold"},
        {"prompt": "Add: 3 + 4 =", "completion": " 7"},
    ]
    for row, example in zip(rows, sft_examples(rows, tokenizer, recipe.keys)):
        prompt_len = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        learned = example["labels"][prompt_len:]
        assert learned == example["input_ids"][prompt_len:]
        assert tokenizer.decode(learned) == row["completion"].strip() + " [SEP]"


def test_chat_labels_cover_exactly_the_assistant_turns():
    recipe = load_recipe("sft_chat")
    tokenizer = load_tokenizer(recipe)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    (example,) = sft_examples([{"messages": messages}], tokenizer, recipe.keys)
    learned = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "paris. [SEP] rome. [SEP]"  # the MiniLM vocabulary is uncased
    assert len(example["input_ids"]) > 3 * len(learned)


def test_sft_lowers_the_loss_on_held_out_completions(tmp_path):
    result = train("sft", overrides={**FAST, "output_dir": str(tmp_path), "max_steps": 40})
    # Measured 10.34 -> 9.3 after 75 steps with a randomly initialised base; 40 steps must clear 0.4.
    assert result.after["completion_loss"] < result.before["completion_loss"] - 0.4


def test_dpo_raises_the_held_out_reward_margin_and_its_reference_is_the_base_model(tmp_path):
    result = train("dpo", overrides={**FAST, "output_dir": str(tmp_path), "max_steps": 30})
    assert result.before == {"reward_margin": 0.0, "reward_accuracy": 0.0}  # policy == reference at B = 0
    assert result.after["reward_margin"] > 0.05 and result.after["reward_accuracy"] > 0.7
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)

    # The reference of the trained model is the bare base model, not a copy with some adapter in it.
    recipe = load_recipe("dpo")
    tokenizer = load_tokenizer(recipe)
    rows = [{"prompt": "Capital of Italy:", "chosen": " Rome", "rejected": " Berlin, obviously"}]
    batch = DpoCollator(tokenizer.pad_token_id)(dpo_examples(rows, tokenizer, recipe.keys))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base_model").eval()
    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base_model"), tmp_path
    )
    with torch.no_grad():
        bare = pair_logprobs(base, batch)
        policy = pair_logprobs(trained, batch)
    reference = reference_logprobs(trained, batch)
    for ref, plain, pol in zip(reference, bare, policy):
        torch.testing.assert_close(ref, plain)
        assert not torch.allclose(pol, plain, atol=1e-3)


def test_a_crash_while_saving_leaves_no_checkpoint_and_resume_takes_the_last_complete_one(
    tmp_path, monkeypatch
):
    calls = {"n": 0}
    original = LoraPlusTrainer._save_rng_state

    def crash_on_second_save(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        original(self, output_dir)

    monkeypatch.setattr(LoraPlusTrainer, "_save_rng_state", crash_on_second_save)
    settings = {
        **FAST,
        "output_dir": str(tmp_path),
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 2,
    }
    with pytest.raises(OSError, match="disk full"):
        train("sft", overrides=settings)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.setattr(LoraPlusTrainer, "_save_rng_state", original)
    result = train("sft", overrides=settings, resume=True)
    assert result.resumed_from.endswith("checkpoint-2") and result.steps == 6
    assert not (tmp_path / STAGING_FOLDER).exists()


# SGD, not Adam: Adam divides tiny gradients by their own size, turning float noise into lr-sized steps.
EXACT = {**FAST, "max_steps": 3, "optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant"}


def assert_trained(folder):
    b = [t for k, t in adapter_tensors(folder).items() if "lora_B" in k]
    assert max(t.abs().max().item() for t in b) > 1e-3


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    common = EXACT
    train("sft", overrides={**common, "output_dir": str(tmp_path / "big"), "per_device_train_batch_size": 16})
    train(
        "sft",
        overrides={
            **common,
            "output_dir": str(tmp_path / "accumulated"),
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2,
        },
    )
    assert_trained(tmp_path / "big")
    assert_same_adapter(tmp_path / "big", tmp_path / "accumulated", atol=1e-6)


def test_classifier_accumulation_matches_one_big_batch(tmp_path):
    # transformers would scale a classifier's mean loss as if it summed over num_items_in_batch
    train(tiny_bert_recipe(output_dir=str(tmp_path / "big"), per_device_train_batch_size=16))
    train(
        tiny_bert_recipe(
            output_dir=str(tmp_path / "accumulated"),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=4,
        )
    )
    assert_trained(tmp_path / "big")
    assert_same_adapter(tmp_path / "big", tmp_path / "accumulated", atol=1e-6)


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    common = EXACT
    train("sft", overrides={**common, "output_dir": str(tmp_path / "plain")})
    train("sft", overrides={**common, "output_dir": str(tmp_path / "ckpt"), "gradient_checkpointing": True})
    assert_trained(tmp_path / "plain")
    assert_same_adapter(tmp_path / "plain", tmp_path / "ckpt", atol=1e-6)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    result = train("sft", overrides={**FAST, "output_dir": str(tmp_path), "max_steps": 3, "bf16": True})
    assert result.steps == 3
    assert all(torch.isfinite(t).all() for t in adapter_tensors(tmp_path).values())


def test_a_datasets_dataset_can_replace_the_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"Add: {a} + 1 =", "completion": f" {a + 1}"} for a in range(32)]
    result = train(
        "sft",
        overrides={**FAST, "output_dir": str(tmp_path), "max_steps": 2, "eval_file": None},
        train_dataset=datasets.Dataset.from_list(rows),
    )
    assert result.steps == 2 and (tmp_path / "adapter_model.safetensors").is_file()


def test_the_saved_tokenizer_and_recipe_let_the_adapter_be_reused(quickstart):
    out, _ = quickstart
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("set an alarm")["input_ids"][0] == tokenizer.cls_token_id
    saved = (out / RECIPE_FILE).read_text()
    assert "labels:" in saved and "smart_home" in saved


def test_a_bottleneck_recipe_trains_with_loraplus_and_saves_bottleneck_weights(tmp_path, capsys):
    bottleneck = {"preset": "pfeiffer", "bottleneck_size": 8}
    recipe = tiny_bert_recipe(output_dir=str(tmp_path), bottleneck=bottleneck, loraplus_lr_ratio=4)
    recipe = {k: v for k, v in recipe.items() if not k.startswith("lora_")}
    result = train(recipe)
    tensors = adapter_tensors(tmp_path)
    assert any(".adapter_down." in k for k in tensors) and not any("lora_" in k for k in tensors)
    up = [t for k, t in tensors.items() if k.endswith("adapter_up.weight")]
    assert up and max(t.abs().max().item() for t in up) > 1e-3  # the zero-initialised side moved
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    assert result.steps == 6 and "with bottleneck adapters" in capsys.readouterr().out


def test_a_bottleneck_recipe_with_lora_keys_is_refused():
    with pytest.raises(RecipeError, match=r"also sets LoRA keys \['lora_r'\]"):
        load_recipe("bottleneck", {"lora_r": 8})


def test_the_progress_bar_shows_steps_loss_and_speed(tmp_path, capsys):
    train(tiny_bert_recipe(output_dir=str(tmp_path), disable_tqdm=False))
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "train: 100%" in bar and "6/6" in bar
    assert "loss=" in bar and "lr=" in bar
    assert "step/s" in bar or "s/step" in bar


def test_train_is_importable_from_lorakit_training_as_the_readme_documents():
    from lorakit.training import train
    from lorakit.training.run import train as runner

    assert train is runner
    with pytest.raises(TypeError):
        train({}, {})  # overrides and everything after recipe are keyword-only
