"""add_weighted_adapter against PEFT 0.21.2 on the same saved adapters.

Both libraries load the adapters PEFT saved, run `add_weighted_adapter` with the same arguments,
and must give the same new adapter: the same A and B factors for the factor-wise forms, the same
weight change (the product `scaling * B @ A`, which does not depend on the free signs of singular
vectors) for the SVD forms, the same config and the same outputs. Where lorakit deliberately
differs (rsLoRA scaling, negative weights in the TIES forms) the test pins the difference.
"""

from __future__ import annotations

import copy
import os

import peft
import pytest
import torch
from torch import nn

from lorakit import merge_utils as merging
from lorakit.tuners.lora.weighted import add_weighted_adapter

from .oracle_helpers import lorakit, wrap

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Tiny(nn.Module):
    """Embedding, two Linear and a Conv2d: the layer types both libraries combine."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 10)
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.fc2(self.fc1(self.emb(ids))).flatten(1), self.conv(image).flatten(1)], dim=1)


NAMES = ["one", "two", "three"]
# different alphas and targets; "equal" has one rank, "mixed" three
SETS = {
    "equal": [
        dict(r=4, lora_alpha=8, target_modules=["emb", "fc1", "fc2", "conv"]),
        dict(r=4, lora_alpha=3, target_modules=["fc1", "conv"]),
        dict(r=4, lora_alpha=5, target_modules=["fc2", "emb"]),
    ],
    "mixed": [
        dict(r=4, lora_alpha=8, target_modules=["emb", "fc1", "fc2", "conv"]),
        dict(r=2, lora_alpha=3, target_modules=["fc1", "conv"]),
        dict(r=6, lora_alpha=5, target_modules=["fc2", "emb"]),
    ],
    "rslora": [
        dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_rslora=True),
        dict(r=6, lora_alpha=3, target_modules=["fc1"], use_rslora=True),
        dict(r=2, lora_alpha=5, target_modules=["fc2"], use_rslora=True),
    ],
}


def _base() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


BASE = _base()
INPUTS = {
    "ids": torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(1)),
    "image": torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(2)),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """Each adapter set, built and saved by PEFT with random nonzero A and B."""
    folders = {}
    for key, configs in SETS.items():
        model = peft.get_peft_model(copy.deepcopy(BASE), peft.LoraConfig(**configs[0]), adapter_name=NAMES[0])
        for name, config in zip(NAMES[1:], configs[1:]):
            model.add_adapter(name, peft.LoraConfig(**config))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param_name, param in sorted(model.named_parameters()):
                if "lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.3)
        folder = str(tmp_path_factory.mktemp(key))
        model.save_pretrained(folder)
        folders[key] = folder
    return folders


def _load(lib, folder: str):
    model = lib.PeftModel.from_pretrained(
        copy.deepcopy(BASE), os.path.join(folder, NAMES[0]), adapter_name=NAMES[0]
    )
    for name in NAMES[1:]:
        model.load_adapter(os.path.join(folder, name), adapter_name=name)
    return model.eval()


def _combine(lib, model, weights, **kwargs) -> None:
    if lib is peft:
        model.add_weighted_adapter(NAMES, weights, "mix", **kwargs)
    else:
        add_weighted_adapter(model.base_model, NAMES, weights, "mix", **kwargs)


def _new_adapter(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{module leaf name: (A, B, weight change)} of adapter "mix"."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_embedding_A") and "mix" in module.lora_embedding_A:
            a, b = module.lora_embedding_A["mix"], module.lora_embedding_B["mix"]
        elif hasattr(module, "lora_A") and "mix" in module.lora_A:
            a, b = module.lora_A["mix"].weight, module.lora_B["mix"].weight
        else:
            continue
        found[name.rsplit(".", 1)[-1]] = (a.detach(), b.detach(), module.get_delta_weight("mix").detach())
    return found


@torch.no_grad()
def _outputs(model) -> torch.Tensor:
    model.set_adapter("mix")
    return model(**INPUTS)


def _both(folder, weights, **kwargs):
    models = {}
    for lib in (peft, lorakit):
        models[lib] = _load(lib, folder)
        _combine(lib, models[lib], weights, **kwargs)
    return models[peft], models[lorakit]


def _assert_same_config(expected, actual) -> None:
    pf, lk = expected.peft_config["mix"], actual.peft_config["mix"]
    assert (lk.r, lk.lora_alpha) == (pf.r, pf.lora_alpha)
    assert set(lk.target_modules) == set(pf.target_modules)


FACTOR_CASES = [
    ("linear", {}, [0.7, -0.4, 1.3]),
    ("ties", dict(density=0.5), [0.7, 0.4, 1.3]),
    ("ties", dict(density=0.6, majority_sign_method="frequency"), [0.7, 0.4, 1.3]),
    ("magnitude_prune", dict(density=0.5), [0.7, -0.4, 1.3]),
    ("dare_linear", dict(density=1.0), [0.7, -0.4, 1.3]),
    ("dare_ties", dict(density=1.0, majority_sign_method="frequency"), [0.7, 0.4, 1.3]),
]


@pytest.mark.parametrize(("combination_type", "kwargs", "weights"), FACTOR_CASES)
def test_factor_wise_forms_give_peft_factors(saved, combination_type, kwargs, weights):
    expected, actual = _both(saved["equal"], weights, combination_type=combination_type, **kwargs)
    _assert_same_config(expected, actual)
    want, got = _new_adapter(expected), _new_adapter(actual)
    assert set(got) == set(want)
    for name, (a, b, _) in want.items():
        torch.testing.assert_close(got[name][0], a, msg=f"{name} A")
        torch.testing.assert_close(got[name][1], b, msg=f"{name} B")
    torch.testing.assert_close(_outputs(actual), _outputs(expected))


SVD_CASES = [
    ("svd", {}, [0.7, -0.4, 1.3]),
    ("svd", dict(svd_rank=3), [0.7, -0.4, 1.3]),
    ("cat", {}, [0.7, -0.4, 1.3]),
    ("ties_svd", dict(density=0.5), [0.7, 0.4, 1.3]),
    ("ties_svd", dict(density=0.6, majority_sign_method="frequency", svd_rank=3), [0.7, 0.4, 1.3]),
    ("magnitude_prune_svd", dict(density=0.5), [0.7, -0.4, 1.3]),
    ("dare_linear_svd", dict(density=1.0), [0.7, -0.4, 1.3]),
    ("dare_ties_svd", dict(density=1.0), [0.7, 0.4, 1.3]),
]


@pytest.mark.parametrize("ranks", ["equal", "mixed"])
@pytest.mark.parametrize(("combination_type", "kwargs", "weights"), SVD_CASES)
def test_svd_and_cat_forms_give_peft_weight_changes(saved, ranks, combination_type, kwargs, weights):
    expected, actual = _both(saved[ranks], weights, combination_type=combination_type, **kwargs)
    _assert_same_config(expected, actual)
    want, got = _new_adapter(expected), _new_adapter(actual)
    assert set(got) == set(want)
    for name, (_, _, delta) in want.items():
        torch.testing.assert_close(got[name][2], delta, atol=2e-6, rtol=1e-4, msg=name)
    torch.testing.assert_close(_outputs(actual), _outputs(expected), atol=1e-5, rtol=1e-4)


def _svd_with_fixed_signs(original):
    """torch.linalg.svd with lorakit's sign convention on the leading min(m, k) pairs."""

    def svd(matrix, full_matrices=True, driver=None):
        u, s, vh = original(matrix, full_matrices=full_matrices, driver=driver)
        t = min(matrix.shape[-2:])
        u_fixed, _, vh_fixed = merging.canonical_signs(u[:, :t], s, vh[:t])
        return torch.cat([u_fixed, u[:, t:]], dim=1), s, torch.cat([vh_fixed, vh[t:]])

    return svd


@pytest.mark.parametrize("combination_type", ["svd", "ties_svd"])
def test_svd_clamp_gives_peft_factors_once_singular_vector_signs_agree(saved, monkeypatch, combination_type):
    """svd_clamp clamps to a quantile of the signed factor entries, so it depends on the sign of
    each singular pair, which LAPACK leaves free. With PEFT's SVD given lorakit's fixed signs,
    the clamped factors are PEFT's."""
    kwargs = dict(combination_type=combination_type, svd_clamp=0.9, svd_rank=3)
    if combination_type == "ties_svd":
        kwargs["density"] = 0.5
    expected = _load(peft, saved["mixed"])
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "svd", _svd_with_fixed_signs(torch.linalg.svd))
        _combine(peft, expected, [0.7, 0.4, 1.3], **kwargs)
    actual = _load(lorakit, saved["mixed"])
    _combine(lorakit, actual, [0.7, 0.4, 1.3], **kwargs)
    unclamped = _load(lorakit, saved["mixed"])
    _combine(lorakit, unclamped, [0.7, 0.4, 1.3], **{**kwargs, "svd_clamp": None})
    want, got, free = _new_adapter(expected), _new_adapter(actual), _new_adapter(unclamped)
    for name, (a, b, _) in want.items():
        torch.testing.assert_close(got[name][0], a, atol=1e-5, rtol=1e-4, msg=f"{name} A")
        torch.testing.assert_close(got[name][1], b, atol=1e-5, rtol=1e-4, msg=f"{name} B")
        assert not torch.allclose(got[name][1], free[name][1]), f"{name}: the clamp changed nothing"


@pytest.mark.parametrize("combination_type", ["linear", "svd", "ties_svd"])
def test_fan_in_fan_out_layers_combine_like_peft(combination_type):
    kwargs = dict(combination_type=combination_type, density=0.5 if combination_type == "ties_svd" else None)
    models = {}
    for lib in (peft, lorakit):
        model = wrap(lib, "gpt2", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        model.add_adapter(
            "other", lib.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
        )
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.2)
        if lib is peft:
            model.add_weighted_adapter(["default", "other"], [0.6, 1.1], "mix", **kwargs)
        else:
            add_weighted_adapter(model.base_model, ["default", "other"], [0.6, 1.1], "mix", **kwargs)
        models[lib] = model
    want, got = _new_adapter(models[peft]), _new_adapter(models[lorakit])
    assert set(got) == set(want) == {"c_attn", "c_fc"}
    for name, (_, _, delta) in want.items():
        torch.testing.assert_close(got[name][2], delta, atol=2e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kwargs", [dict(combination_type="cat"), dict(combination_type="svd", svd_rank=10)])
def test_rslora_sources_peft_scales_the_result_by_sqrt_r_lorakit_does_not(saved, kwargs):
    """PEFT gives the new adapter lora_alpha = r and keeps use_rslora, so its scaling is sqrt(r),
    not 1. lorakit's new adapter (scaling 1) reproduces the true weighted sum."""
    weights = [0.7, -0.4, 1.3]
    expected, actual = _both(saved["rslora"], weights, **kwargs)
    rank = expected.peft_config["mix"].r
    assert expected.peft_config["mix"].use_rslora and not actual.peft_config["mix"].use_rslora
    reference = _load(lorakit, saved["rslora"])
    layers = {n.rsplit(".", 1)[-1]: m for n, m in reference.named_modules() if hasattr(m, "scaling")}
    want, got = _new_adapter(expected), _new_adapter(actual)
    for name, (_, _, delta) in want.items():
        layer = layers[name]
        true_change = sum(w * layer.get_delta_weight(a) for a, w in zip(NAMES, weights) if a in layer.r)
        torch.testing.assert_close(got[name][2], true_change, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(delta, rank**0.5 * true_change, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("combination_type", ["ties", "ties_svd", "dare_ties"])
def test_a_negative_weight_equals_peft_on_the_negated_adapter(saved, combination_type):
    """lorakit negates an adapter with a negative weight before the sign election; PEFT elects on
    the un-negated one. So lorakit with weight -w equals PEFT on the adapter negated (A -> -A)
    with weight +w."""
    density = 1.0 if combination_type == "dare_ties" else 0.5
    expected = _load(peft, saved["equal"])
    with torch.no_grad():
        for module in expected.modules():
            if hasattr(module, "lora_A") and "two" in module.lora_A:
                module.lora_A["two"].weight.neg_()
    _combine(peft, expected, [0.7, 0.4, 1.3], combination_type=combination_type, density=density)
    actual = _load(lorakit, saved["equal"])
    _combine(lorakit, actual, [0.7, -0.4, 1.3], combination_type=combination_type, density=density)
    want, got = _new_adapter(expected), _new_adapter(actual)
    for name, (_, _, delta) in want.items():
        torch.testing.assert_close(got[name][2], delta, atol=2e-6, rtol=1e-4, msg=name)


def test_combined_adapter_saved_by_lorakit_loads_in_peft_with_the_same_outputs(saved, tmp_path):
    model = _load(lorakit, saved["mixed"])
    _combine(lorakit, model, [0.7, -0.4, 1.3], combination_type="svd", svd_rank=5)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(
        copy.deepcopy(BASE), os.path.join(tmp_path, "mix"), adapter_name="mix"
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**INPUTS), _outputs(model))
