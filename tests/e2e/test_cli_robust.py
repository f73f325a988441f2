"""The `lorakit` command when things go wrong: failed writes, stale base models, bad data rows, and
resuming from the last checkpoint."""

import errno
import json
import os
import resource
import signal
from contextlib import contextmanager

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

import lorakit.save_and_load
from lorakit.cli import main
from tests.helpers import tiny_bert_recipe


def write_recipe(folder, **overrides):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_bert_recipe(**overrides)))
    return path


def error_lines(stderr: str) -> list[str]:
    """The lines lorakit wrote to stderr (transformers' progress bars share the stream)."""
    return [line for line in stderr.splitlines() if line.startswith("lorakit")]


@contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` into any file fail in this process, as the kernel fails them on a full
    disk (with EFBIG where a full disk says ENOSPC); no root and no special file system needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny-BERT run (adapter, recipe and `base_model` in one folder)."""
    folder = tmp_path_factory.mktemp("trained")
    assert main(["train", str(write_recipe(folder)), "--output_dir", str(folder / "run")]) == 0
    return folder / "run"


# ---- 1. failed writes ----------------------------------------------------------------------------
def test_a_write_the_kernel_refuses_during_merge_is_one_line_exit_2_and_leaves_nothing(
    trained, tmp_path, capsys
):
    out = tmp_path / "merged"
    with file_size_limit(64 * 1024):  # the merged model's weights are megabytes
        status = main(["merge", str(trained), "--out", str(out)])
    stderr = capsys.readouterr().err
    assert status == 2
    assert error_lines(stderr) == [
        f"lorakit: error: merge failed on {out}: {os.strerror(errno.EFBIG)} (errno {errno.EFBIG}); "
        "raise the file-size limit (ulimit -f), or point --out at another disk."
    ]
    assert "Traceback" not in stderr
    assert not any(tmp_path.iterdir())  # neither the folder nor its staging copy


@pytest.mark.parametrize(
    "failure",
    [
        lambda path: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path),
        # what safetensors' writer raises on a full disk: the errno in its text, no path
        lambda path: SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
    ],
    ids=["OSError", "SafetensorError"],
)
def test_a_full_disk_while_saving_the_adapter_is_one_line_exit_2_and_leaves_no_partial_file(
    failure, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 1000)  # the part that fitted
        raise failure(filename)

    monkeypatch.setattr(lorakit.save_and_load, "save_file", full_disk)
    status = main(["train", str(write_recipe(tmp_path)), "--output_dir", str(run)])
    stderr = capsys.readouterr().err
    assert status == 2
    (line,) = error_lines(stderr)
    assert line.startswith(f"lorakit: error: train failed on {run}")
    assert line.endswith(
        f": {os.strerror(errno.ENOSPC)} (errno {errno.ENOSPC}); free some space there, or point "
        "--output_dir at another disk."
    )
    assert "Traceback" not in stderr
    left = {p.name for p in run.iterdir()}
    assert "adapter_model.safetensors" not in left and "adapter_config.json" not in left
    assert not [name for name in left if name.endswith(".tmp")]


# ---- 2. the base model built from model_config -----------------------------------------------------
def test_a_target_that_matches_nothing_leaves_no_base_model_behind(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", str(write_recipe(tmp_path)), "--output_dir", str(run)]
    assert main([*argv, "--lora_target_modules", "[qurey]"]) == 2
    assert "matched no module" in capsys.readouterr().err
    assert not run.exists() or not any(run.iterdir())  # no base_model, no staging copy of it


def test_a_rerun_with_a_changed_model_config_rebuilds_the_base_model(tmp_path):
    run = tmp_path / "run"
    argv = ["train", str(write_recipe(tmp_path)), "--output_dir", str(run), "--max_steps", "1"]
    assert main(argv) == 0
    built = tiny_bert_recipe()["model_config"]
    wider = {**built, "intermediate_size": built["intermediate_size"] + 16}
    assert main([*argv, "--model_config", json.dumps(wider)]) == 0
    saved = json.loads((run / "base_model" / "config.json").read_text())
    assert saved["intermediate_size"] == wider["intermediate_size"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # nor the one it replaced
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0  # the adapter fits it


def test_resuming_onto_a_base_model_built_from_another_model_config_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", str(write_recipe(tmp_path, save_strategy="steps", save_steps=1, max_steps=1))]
    assert main([*argv, "--output_dir", str(run)]) == 0
    built = tiny_bert_recipe()["model_config"]
    wider = {**built, "intermediate_size": built["intermediate_size"] + 16}
    resume = [*argv, "--output_dir", str(run), "--resume", "--max_steps", "2"]
    assert main([*resume, "--model_config", json.dumps(wider)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{run / 'base_model'} was built from another model_config" in line
    assert f"intermediate_size: {built['intermediate_size']} there, {wider['intermediate_size']} in" in line
    saved = json.loads((run / "base_model" / "config.json").read_text())
    assert saved["intermediate_size"] == built["intermediate_size"]
    assert main([*resume, "--model_config", json.dumps(built)]) == 0  # its own config resumes


# ---- 3. data rows ----------------------------------------------------------------------------------
GOOD = [{"text": "turn on the light", "label": "on"}, {"text": "turn it off", "label": "off"}]
SFT = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "3+3=", "completion": " 6"}]
DPO = [{"prompt": "Say hi", "chosen": "hi", "rejected": "no"}] * 2


@pytest.mark.parametrize(
    "recipe, rows, message",
    [
        (None, [*GOOD, {"text": "dim it"}], "row 2 has no 'label' value; give it one or drop the row"),
        (None, [{"text": "x", "label": None}, *GOOD, {"text": "y"}], "row 0 has no 'label' value (nor does 1 more row)"),
        (None, [*GOOD, {"text": "dim it", "label": ["on"]}], "row 2: 'label' (label_column) must be a string or an integer, got list ['on']"),
        (None, [{"text": "dim it", "label": {"name": "on"}}, *GOOD], "row 0: 'label' (label_column) must be a string or an integer, got dict {'name': 'on'}"),
        (None, [*GOOD, {"text": 42, "label": "on"}], "row 2: 'text' (text_column) must be a string, got int 42"),
        ("sft", [*SFT, {"prompt": "1+1=", "completion": 2}], "row 2: 'completion' (completion_column) must be a string, got int 2"),
        ("sft", [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": "hi"}], "row 1: 'messages' (messages_column) must be a list of {'role': ..., 'content': ...} objects, got str 'hi'"),
        ("sft", [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"content": "hi"}]}], "row 1: 'messages' (messages_column) must be a list of {'role': ..., 'content': ...} objects, got list"),
        ("dpo", [*DPO, {"prompt": "Say hi", "chosen": ["hi"], "rejected": "no"}], "row 2: 'chosen' (chosen_column) must be a string, got list ['hi']"),
    ],
    ids=["missing-label", "missing-labels", "list-label", "dict-label", "int-text", "int-completion", "str-messages", "roleless-message", "list-chosen"],
)  # fmt: skip
def test_a_bad_data_row_is_named_with_its_index_column_and_type(recipe, rows, message, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    name = recipe or str(write_recipe(tmp_path))
    argv = [
        "train",
        name,
        "--train_file",
        str(data),
        "--eval_file",
        "null",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("lorakit: error: train data row ") and message in line
    assert not (tmp_path / "run").exists()


def test_a_bad_eval_row_is_named_as_eval_data(tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [*GOOD, {"text": "dim", "label": [1]}]))
    recipe = write_recipe(tmp_path)
    assert main(["train", str(recipe), "--eval_file", str(data), "--output_dir", str(tmp_path / "run")]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "eval data row 2: 'label' (label_column) must be a string or an integer, got list" in line


# ---- 4. resuming at max_steps, and the run's own files ------------------------------------------
def logged_steps(run) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [entry["step"] for entry in map(json.loads, lines) if "loss" in entry]


def test_resume_from_a_checkpoint_at_max_steps_inside_an_epoch_trains_no_extra_step(tmp_path):
    # 16 rows in batches of 8: step 5 ends inside the third epoch, where transformers would train a 6th
    recipe = write_recipe(tmp_path, max_steps=5, save_strategy="steps", save_steps=5)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--output_dir", str(run)]) == 0
    straight = load_file(run / "adapter_model.safetensors")
    assert (run / "checkpoint-5").is_dir() and logged_steps(run) == [1, 2, 3, 4, 5]
    (run / "adapter_model.safetensors").unlink()  # as if killed after the last checkpoint
    (run / "adapter_config.json").unlink()

    assert main(["train", str(recipe), "--output_dir", str(run), "--resume"]) == 0
    resumed = load_file(run / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
    assert logged_steps(run) == [1, 2, 3, 4, 5]
    assert json.loads((run / "summary.json").read_text())["steps"] == 5


def test_a_failed_write_of_summary_json_keeps_the_previous_one_whole(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path, max_steps=1)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--output_dir", str(run)]) == 0
    before = (run / "summary.json").read_text()
    real_replace = os.replace

    def refuse_summary(src, dst, *args, **kwargs):
        if str(dst).endswith("summary.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse_summary)
    assert main(["train", str(recipe), "--output_dir", str(run), "--max_steps", "2"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "summary.json" in line and os.strerror(errno.ENOSPC) in line
    assert (run / "summary.json").read_text() == before  # the old summary, whole
    assert json.loads(before)["steps"] == 1
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
