"""Recipes: keys, types, aliases and every check that must fail before training starts."""

import textwrap

import pytest
import yaml

from lorakit.training.data import check_columns, read_rows
from lorakit.training.recipe import (
    RecipeError,
    load_recipe,
    parse_overrides,
    resolve_recipe_path,
    shipped_recipes,
)
from lorakit.training.run import lora_config, train

SEED_003_RECIPE = """
# Model arguments
model_name_or_path: all-MiniLM-L6-v2
torch_dtype: auto

# LoRA arguments
use_peft: true
lora_r: 256
lora_alpha: 256
lora_dropout: 0.1
lora_target_modules:
- q_proj
- k_proj
- o_proj
- up_proj
- gate_proj

# DPOTrainer arguments
task: dpo
bf16: true
beta: 0.1
do_eval: true
evaluation_strategy: epoch
eval_steps: 100
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: openchat
learning_rate: 5.0e-7
log_level: info
logging_steps: 10
lr_scheduler_type: linear
max_length: 1024
max_prompt_length: 512
num_train_epochs: 1
optim: adafactor
output_dir: /tmp/openchat-rslora-r256
per_device_train_batch_size: 12
per_device_eval_batch_size: 12
push_to_hub: false
save_strategy: "no"
save_total_limit: null
seed: 42
warmup_ratio: 0.1
report_to: none
run_name: "openchat-rslora-r256"
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_every_shipped_recipe_loads_and_names_existing_data():
    names = set(shipped_recipes())
    assert {"quickstart", "sft", "sft_chat", "dpo", "bottleneck"} <= names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.keys.train_file and read_rows(recipe.keys.train_file)
        assert recipe.keys.eval_file and read_rows(recipe.keys.eval_file)
    assert resolve_recipe_path(None) == shipped_recipes()["quickstart"]


def test_the_rslora_articles_alignment_handbook_recipe_is_understood(tmp_path):
    recipe = load_recipe(write(tmp_path, SEED_003_RECIPE))
    assert recipe.training["eval_strategy"] == "epoch"  # old name evaluation_strategy
    assert recipe.training["learning_rate"] == pytest.approx(5e-7)
    assert recipe.training["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert recipe.keys.max_prompt_length == 512 and recipe.keys.beta == 0.1
    config = lora_config(recipe)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (256, 256, 0.1)
    assert config.target_modules == {"q_proj", "k_proj", "o_proj", "up_proj", "gate_proj"}
    assert config.task_type == "CAUSAL_LM"


def test_handbook_dataset_keys_are_refused_with_what_to_write_instead(tmp_path):
    text = (
        SEED_003_RECIPE
        + "dataset_mixer:\n  HuggingFaceH4/ultrafeedback_binarized: 1.0\npreprocessing_num_workers: 12\n"
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text))
    assert "'dataset_mixer' is not supported: point train_file/eval_file" in str(err.value)
    assert "'preprocessing_num_workers' is not supported" in str(err.value)


def test_unknown_keys_are_all_named_with_the_closest_known_key():
    with pytest.raises(RecipeError) as err:
        load_recipe("quickstart", {"lora_rank": 8, "learnig_rate": 1e-3, "zzz": 1})
    message = str(err.value)
    assert "unknown key 'lora_rank'; did you mean 'lora_r'?" in message
    assert "unknown key 'learnig_rate'; did you mean 'learning_rate'?" in message
    assert "unknown key 'zzz'" in message


def test_yaml_strings_that_are_numbers_become_numbers_and_wrong_types_are_refused(tmp_path):
    recipe = load_recipe(
        write(tmp_path, "task: sft\nmodel_name_or_path: all-MiniLM-L6-v2\nlearning_rate: 1e-4\nlora_r: '8'\n")
    )
    assert recipe.training["learning_rate"] == 1e-4 and isinstance(recipe.training["learning_rate"], float)
    assert recipe.keys.lora_r == 8
    with pytest.raises(RecipeError, match="'lora_r' must be int, got 'eight'"):
        load_recipe("sft", {"lora_r": "eight"})
    with pytest.raises(RecipeError, match="'lora_r' must be int, got 2.5"):
        load_recipe("sft", {"lora_r": 2.5})
    with pytest.raises(RecipeError, match="must be a positive integer"):
        load_recipe("sft", {"lora_r": 0})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"task": "pretrain"}, "task='pretrain' is not one of classification, sft, dpo"),
        ({"model_name_or_path": "all-MiniLM-L6-v2"}, "Give exactly one of model_name_or_path"),
        ({"model_config": {"hidden_size": 8}}, "model_config needs a model_type"),
        ({"train_file": "missing.jsonl"}, "train_file='.*missing.jsonl': no such file"),
        (
            {"model_config": None, "model_name_or_path": "./no/such/model"},
            "Model folder './no/such/model' does not exist",
        ),
        ({"lora_dropout": 1.5}, r"lora_dropout must be in \[0, 1\)"),
        ({"beta": 0}, "beta must be > 0"),
    ],
)
def test_bad_values_are_refused_with_the_key_and_the_fix(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("dpo", overrides)


def test_data_problems_name_the_column_and_the_recipe_key(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"sentence": "hi", "label": "a"}\n{"sentence": "yo", "label": "b"}\n')
    recipe = load_recipe("quickstart", {"train_file": str(data)})
    with pytest.raises(
        RecipeError, match=r"no column 'text'; its columns are \['label', 'sentence'\]. Set text_column"
    ):
        check_columns(recipe.keys, read_rows(data), "train data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\n{"text": broken\n')
    with pytest.raises(RecipeError, match="bad.jsonl:2 is not valid JSON"):
        read_rows(bad)
    with pytest.raises(RecipeError, match="must be .jsonl, .json or .csv"):
        read_rows(write(tmp_path, "x", "data.txt"))


def test_csv_and_json_files_read_as_rows(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello there,greet\nbye now,leave\n")
    (tmp_path / "d.json").write_text(
        '[{"text": "hello there", "label": "greet"}, {"text": "bye now", "label": "leave"}]'
    )
    assert read_rows(tmp_path / "d.csv") == read_rows(tmp_path / "d.json")


def test_a_target_that_matches_nothing_fails_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"target_modules=\['q_prj'\] matched no module"):
        train("sft", overrides={"lora_target_modules": ["q_prj"], "output_dir": str(out)})
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))


def test_an_output_dir_with_checkpoints_needs_resume(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(RecipeError, match="already holds checkpoints .*checkpoint-4.*--resume"):
        train("sft", overrides={"output_dir": str(tmp_path)})


def test_full_fine_tuning_is_refused_not_ignored():
    with pytest.raises(RecipeError, match="use_peft: false"):
        train("sft", overrides={"use_peft": False})


def test_command_line_overrides_parse_as_yaml_scalars():
    overrides = parse_overrides(
        ["--learning_rate", "3e-4", "--lora-target-modules=[q_proj, v_proj]", "--bf16", "--max_steps", "5"]
    )
    assert overrides == {
        "learning_rate": "3e-4",  # a string here; load_recipe converts it by the field's type
        "lora_target_modules": ["q_proj", "v_proj"],
        "bf16": True,
        "max_steps": 5,
    }
    assert load_recipe("sft", overrides).training["learning_rate"] == 3e-4
    with pytest.raises(RecipeError, match="Unexpected argument 'stray'"):
        parse_overrides(["stray"])


def test_relative_data_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    path = write(tmp_path, "task: sft\nmodel_name_or_path: all-MiniLM-L6-v2\ntrain_file: data/t.jsonl\n")
    monkeypatch.chdir("/")
    assert load_recipe(path).keys.train_file == str(tmp_path / "data" / "t.jsonl")
    assert yaml.safe_load(path.read_text())["train_file"] == "data/t.jsonl"
