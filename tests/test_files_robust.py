"""Adapter folders under hostile conditions: saves killed at any moment, loads that fail after a
data-driven init or a layer replication, and files with wrong types, values or bytes."""

import os
import random
import shutil
import signal
import time

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from .conftest import randomize_adapters, tiny_llama

# ---- 1. a save killed at any moment leaves the old or the new adapter ------------------------


def _adapter(seed: int, alpha: int):
    """An adapter on q_proj/v_proj with random weights; two of them differ only in values and alpha,
    so new weights under an old config would load without any shape error."""
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
    )
    randomize_adapters(model, seed=seed)
    return model


def _which(folder, base, adapters: dict) -> str:
    """The name of the adapter in `adapters` that `folder` loads as, exactly (weights and alpha)."""
    loaded = PeftModel.from_pretrained(base, folder)
    weights = get_peft_model_state_dict(loaded)
    alpha = loaded.peft_config["default"].lora_alpha
    loaded.unload()
    for name, model in adapters.items():
        expected = get_peft_model_state_dict(model)
        if (
            alpha == model.peft_config["default"].lora_alpha
            and weights.keys() == expected.keys()
            and all(torch.equal(weights[k], expected[k]) for k in expected)
        ):
            return name
    raise AssertionError(f"{folder} loads as none of {list(adapters)} (lora_alpha={alpha}): a mix")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a saving process")
def test_save_killed_at_random_moments_leaves_the_old_or_the_new_adapter(tmp_path):
    adapters = {"a": _adapter(seed=1, alpha=8), "b": _adapter(seed=2, alpha=32)}
    # a -> b, b -> a as .bin, .bin -> .bin, .bin -> safetensors: every kind of replacement
    cycle = [("a", True), ("b", True), ("a", False), ("b", False)]
    folder = str(tmp_path / "adapter")
    adapters["a"].save_pretrained(folder)
    base = tiny_llama()
    rng = random.Random(0)
    seen = set()
    for kill in range(30):
        pid = os.fork()
        if pid == 0:  # the child saves in a loop until it is killed, and never returns into pytest
            try:
                _slow_down_renames()
                for step in range(10**6):
                    name, safe = cycle[(kill + step) % len(cycle)]
                    adapters[name].save_pretrained(folder, safe_serialization=safe)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "the saving process died of an error before it was killed"
        seen.add(_which(folder, base, adapters))
    assert seen == {"a", "b"}


def _slow_down_renames(pause: float = 0.003) -> None:
    """Pause after each rename and delete (in the forked child only), so that a kill lands between two
    steps of a save about as often as inside a write; the order of the steps is unchanged."""
    for name in ("replace", "remove"):
        real = getattr(os, name)

        def slow(*args, _real=real, **kwargs):
            _real(*args, **kwargs)
            time.sleep(pause)

        setattr(os, name, slow)


@pytest.mark.parametrize("old_safe, new_safe", [(True, True), (True, False), (False, True)])
def test_every_step_of_a_save_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, old_safe, new_safe):
    adapters = {"old": _adapter(seed=1, alpha=8), "new": _adapter(seed=2, alpha=32)}
    folder = tmp_path / "adapter"
    adapters["old"].save_pretrained(folder, safe_serialization=old_safe)
    snapshots = []

    def copy_folder():  # the folder as a kill at this moment would leave it
        snapshots.append(shutil.copytree(folder, tmp_path / f"step{len(snapshots)}"))

    for name in ("replace", "remove"):
        real = getattr(os, name)

        def step(*args, _real=real, **kwargs):
            copy_folder()
            _real(*args, **kwargs)
            copy_folder()

        monkeypatch.setattr(os, name, step)
    adapters["new"].save_pretrained(folder, safe_serialization=new_safe)
    monkeypatch.undo()
    base = tiny_llama()
    states = [_which(snapshot, base, adapters) for snapshot in snapshots]
    assert states[0] == "old" and states[-1] == "new" and _which(folder, base, adapters) == "new"
    assert states == sorted(states, key=["old", "new"].index), "a later step went back to the old adapter"
    newest = _adapter(seed=3, alpha=16)
    for snapshot in snapshots:  # the next save finishes or drops whatever an interrupted one left
        newest.save_pretrained(snapshot)
        assert sorted(os.listdir(snapshot)) == ["adapter_config.json", "adapter_model.safetensors"]
        assert _which(snapshot, base, {"newest": newest}) == "newest"
