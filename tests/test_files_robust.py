"""Adapter folders under hostile conditions: saves killed at any moment, loads that fail after a
data-driven init or a layer replication, and files with wrong types, values or bytes."""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from tests.helpers import randomize_adapters, tiny_llama

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


# ---- 2. a failed load leaves the model exactly as it was ---------------------------------------


def _everything(model: torch.nn.Module) -> dict:
    """All a failed load could change: parameter objects and values, module names, adapters, the
    active adapter, and what a layer replication rewrites (block count, attention layer indices)."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "parameter_ids": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "module_names": [name for name, _ in model.named_modules()],
        "adapters": list(model.peft_config) if isinstance(model, PeftModel) else None,
        "active": model.active_adapter if isinstance(model, PeftModel) else None,
        "num_hidden_layers": inner.config.num_hidden_layers,
        "layer_idx": [m.layer_idx for m in inner.modules() if hasattr(m, "layer_idx")],
    }


def _assert_unchanged(before: dict, after: dict) -> None:
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key
    for field in ("parameter_ids", "module_names", "adapters", "active", "num_hidden_layers", "layer_idx"):
        assert after[field] == before[field], field


def _broken(folder, how: str) -> None:
    """Damage the saved adapter in `folder` so that its weights no longer fit the config."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    first = sorted(tensors)[0]
    if how == "shape":
        tensors[first] = tensors[first][:1]
    elif how == "missing":
        del tensors[first]
    elif how == "unexpected":
        tensors["base_model.model.model.norm.lora_A.weight"] = torch.zeros(2, 32)
    save_file(tensors, path)


MUTATING_CONFIGS = {
    "pissa": {"init_lora_weights": "pissa"},
    "layer_replication": {"layer_replication": [[0, 2], [1, 2]]},
    "both": {"init_lora_weights": "pissa_niter_2", "layer_replication": [[0, 1], [0, 2]]},
}


def _saved_mutating_adapter(folder, kind: str, how: str) -> None:
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **MUTATING_CONFIGS[kind])
    with pytest.warns(UserWarning) if "init_lora_weights" in MUTATING_CONFIGS[kind] else _no_warning():
        model = get_peft_model(tiny_llama(seed=4), config)
    model.save_pretrained(folder)
    _broken(folder, how)


@contextlib.contextmanager
def _no_warning():
    yield


@pytest.mark.parametrize("how", ["shape", "missing", "unexpected"])
@pytest.mark.parametrize("kind", list(MUTATING_CONFIGS))
def test_failed_load_adapter_with_a_mutating_config_leaves_the_model_as_it_was(tmp_path, kind, how):
    _adapter(seed=1, alpha=8).save_pretrained(tmp_path / "good")
    _saved_mutating_adapter(tmp_path / "bad", kind, how)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "good", is_trainable=True)
    before = _everything(model)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="do not fit this model"):
        warnings.simplefilter("ignore")  # the data-driven init warns that it replaced base weights
        model.load_adapter(tmp_path / "bad", adapter_name="bad")
    _assert_unchanged(before, _everything(model))


@pytest.mark.parametrize("kind", list(MUTATING_CONFIGS))
def test_failed_from_pretrained_with_a_mutating_config_leaves_the_base_model_as_it_was(tmp_path, kind):
    _saved_mutating_adapter(tmp_path / "bad", kind, "shape")
    base = tiny_llama()
    before = _everything(base)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="do not fit this model"):
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(base, tmp_path / "bad")
    _assert_unchanged(before, _everything(base))


def test_name_of_a_failed_inference_load_can_be_reused_for_a_trainable_adapter(tmp_path):
    _adapter(seed=1, alpha=8).save_pretrained(tmp_path / "good")
    _adapter(seed=2, alpha=8).save_pretrained(tmp_path / "bad")
    _broken(tmp_path / "bad", "shape")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "good", is_trainable=True)
    with pytest.raises(ValueError, match="do not fit this model"):
        model.load_adapter(tmp_path / "bad", adapter_name="other")  # an inference-mode load
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    model.set_adapter("other")
    other = [p for n, p in model.named_parameters() if ".other." in n]
    assert other and all(p.requires_grad for p in other)


# ---- 3. fuzzed files: each gives an error naming the field or the key --------------------------


def _saved_then(
    folder, *, config_text: bytes | None = None, fields: dict | None = None, weights=None
) -> None:
    """A good adapter saved in `folder`, then its config replaced (raw bytes or changed fields) or
    its weights rewritten by `weights(tensors)`."""
    _adapter(seed=1, alpha=8).save_pretrained(folder)
    config_path = folder / "adapter_config.json"
    if fields is not None:
        data = json.loads(config_path.read_text())
        config_text = json.dumps({**data, **fields}).encode()
    if config_text is not None:
        config_path.write_bytes(config_text)
    if weights is not None:
        tensors = load_file(folder / "adapter_model.safetensors")
        weights(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")


BAD_FIELDS = [
    ({"lora_dropout": "0.1"}, r"lora_dropout='0\.1' must be a number"),
    ({"lora_dropout": [0.1]}, r"lora_dropout=\[0\.1\] must be a number"),
    ({"lora_dropout": True}, r"lora_dropout=True must be a number"),
    ({"use_rslora": "false"}, r"use_rslora='false' must be True or False"),
    ({"use_dora": "false"}, r"use_dora='false' must be True or False"),
    ({"fan_in_fan_out": 0}, r"fan_in_fan_out=0 must be True or False"),
    ({"inference_mode": "true"}, r"inference_mode='true' must be True or False"),
    ({"lora_alpha": -8}, r"lora_alpha=-8 must be a finite number >= 0"),
    ({"lora_alpha": float("nan")}, r"lora_alpha=nan must be a finite number"),
    ({"lora_alpha": float("inf")}, r"lora_alpha=inf must be a finite number"),
    ({"alpha_pattern": {"q_proj": float("-inf")}}, r"alpha_pattern\['q_proj'\]=-inf must be a finite number"),
    ({"r": "4"}, r"r='4': the LoRA rank must be a positive integer"),
]


@pytest.mark.parametrize("fields, message", BAD_FIELDS, ids=[str(f) for f, _ in BAD_FIELDS])
def test_a_config_field_of_a_wrong_type_or_value_is_an_error_naming_the_field(tmp_path, fields, message):
    _saved_then(tmp_path, fields=fields)
    base = tiny_llama()
    before = _everything(base)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    _assert_unchanged(before, _everything(base))
    with pytest.raises(ValueError, match=message):  # the same check when the config is built in Python
        LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **fields})


@pytest.mark.parametrize(
    "text, message",
    [
        (b"[1, 2]", r"holds JSON \[1, 2\], not an object of config fields"),
        (b"null", r"holds JSON null, not an object"),
        (b'"LORA"', r'holds JSON "LORA", not an object'),
        (b'{"peft_type": "LORA", "r": "\xff\xfe"}', r"is not valid JSON in UTF-8"),
        (b'{"peft_type": "LORA", "r": 4', r"is not valid JSON in UTF-8"),
    ],
    ids=["list", "null", "string", "not-utf8", "truncated"],
)
def test_a_config_file_that_is_no_json_object_is_an_error_naming_the_file(tmp_path, text, message):
    _saved_then(tmp_path, config_text=text)
    with pytest.raises(ValueError, match=message) as raised:
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert "adapter_config.json" in str(raised.value)


KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t[KEY].view(-1).__setitem__(3, float("nan")),
            "hold NaN or Inf values in " + re.escape(KEY),
        ),
        (
            lambda t: t[KEY].view(-1).__setitem__(0, float("-inf")),
            "hold NaN or Inf values in " + re.escape(KEY),
        ),
        (
            lambda t: t.__setitem__(KEY, t[KEY].to(torch.int32)),
            rf"non-float tensors {re.escape(KEY)} \(torch\.int32\)",
        ),
        (lambda t: t.__setitem__(KEY, t[KEY].bool()), rf"non-float tensors {re.escape(KEY)} \(torch\.bool\)"),
    ],
    ids=["nan", "inf", "int32", "bool"],
)
def test_weights_that_are_not_finite_floats_are_an_error_naming_the_key(tmp_path, change, message):
    _saved_then(tmp_path, weights=change)
    base = tiny_llama()
    before = _everything(base)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    _assert_unchanged(before, _everything(base))
