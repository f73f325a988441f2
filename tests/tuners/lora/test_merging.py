"""add_weighted_adapter and its merging algorithms, checked against their definitions.

The pure functions of `lorakit.merge_utils` are compared with the papers' definitions written out
entry by entry on small tensors; the adapter-level function is compared with the dense weighted sum
of the true weight changes, `sum_i w_i * s_i * B_i A_i`, taken from each layer's `get_delta_weight`.
"""

import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit import merge_utils as merging
from lorakit.tuners.lora.layer import LoraLayer
from lorakit.tuners.lora.weighted import add_weighted_adapter
from tests.helpers import assert_same_state, state_snapshot


# ---- the pure functions ------------------------------------------------------------------------
def test_prune_by_magnitude_keeps_the_int_density_times_numel_largest_entries():
    tensor = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    # int(0.5 * 6) = 3 entries survive: -3.0, 2.0, 1.0
    expected = torch.tensor([[0.0, -3.0, 0.0], [2.0, 0.0, 1.0]])
    assert torch.equal(merging.prune_by_magnitude(tensor, 0.5), expected)
    assert merging.prune_by_magnitude(tensor, 1.0) is tensor


def _ties_by_definition(tensors, weights, density, method):
    """TIES (Yadav et al., 2023, Alg. 1) entry by entry: trim each task vector to its top-k
    magnitudes, elect gamma = sgn(sum of trimmed values) ("total") or sgn(sum of their signs)
    ("frequency"), ties to +, then average w_t * tau_t over the t whose sign equals gamma.
    A negative weight negates its task vector first."""
    vectors = [(t * (1 if w >= 0 else -1)).flatten().tolist() for t, w in zip(tensors, weights)]
    keep = int(density * len(vectors[0]))
    trimmed = []
    for vector in vectors:
        largest = sorted(range(len(vector)), key=lambda i: -abs(vector[i]))[:keep]
        trimmed.append([v if i in largest else 0.0 for i, v in enumerate(vector)])
    merged = []
    for p in range(len(vectors[0])):
        values = [vector[p] for vector in trimmed]
        votes = sum(values) if method == "total" else sum((v > 0) - (v < 0) for v in values)
        gamma = 1 if votes >= 0 else -1
        agreeing = [abs(w) * v for v, w in zip(values, weights) if (v > 0) - (v < 0) == gamma]
        merged.append(sum(agreeing) / max(len(agreeing), 1))
    return torch.tensor(merged).view_as(tensors[0])


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.4, 1.0])
def test_ties_follows_the_paper_trim_elect_disjoint_mean(method, density):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 5, generator=g) for _ in range(3)]
    weights = [0.5, 2.0, 1.0]
    actual = merging.ties(tensors, torch.tensor(weights), density, method)
    torch.testing.assert_close(actual, _ties_by_definition(tensors, weights, density, method))


def test_total_and_frequency_elect_different_signs_where_mass_and_count_disagree():
    # one entry: +3 from one task, -1 from two tasks. Mass says +, head count says -.
    tensors = [torch.tensor([3.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    ones = torch.ones(3)
    assert merging.ties(tensors, ones, 1.0, "total").item() == 3.0
    assert merging.ties(tensors, ones, 1.0, "frequency").item() == -1.0


def test_a_negative_weight_negates_its_task_tensor_and_a_zero_weight_removes_it():
    g = torch.Generator().manual_seed(1)
    first, second = torch.randn(6, generator=g), torch.randn(6, generator=g)
    negated = merging.ties([first, second], torch.tensor([1.0, -0.5]), 0.5)
    flipped = merging.ties([first, -second], torch.tensor([1.0, 0.5]), 0.5)
    torch.testing.assert_close(negated, flipped)
    alone = merging.ties([first], torch.tensor([1.0]), 0.5)
    torch.testing.assert_close(merging.ties([first, second], torch.tensor([1.0, 0.0]), 0.5), alone)


def test_magnitude_prune_is_the_weighted_sum_of_trimmed_tensors():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(3, 4, generator=g) for _ in range(2)]
    expected = 2.0 * merging.prune_by_magnitude(tensors[0], 0.5) - 1.0 * merging.prune_by_magnitude(
        tensors[1], 0.5
    )
    torch.testing.assert_close(merging.magnitude_prune(tensors, torch.tensor([2.0, -1.0]), 0.5), expected)


def test_dare_drop_keeps_the_expected_value_and_the_keep_rate():
    density, draws = 0.3, 4000
    g = torch.Generator().manual_seed(3)
    tensor = torch.randn(50, generator=g)
    samples = torch.stack([merging.prune_randomly(tensor, density, generator=g) for _ in range(draws)])
    kept = (samples != 0).float().mean().item()
    # each kept-fraction estimate has std sqrt(p (1-p) / n); the per-entry mean has std
    # |t| sqrt((1-p)/p / draws): allow 5 standard deviations
    assert abs(kept - density) < 5 * (density * (1 - density) / samples.numel()) ** 0.5
    tolerance = 5 * tensor.abs() * ((1 - density) / density / draws) ** 0.5
    assert ((samples.mean(dim=0) - tensor).abs() <= tolerance).all()
    survivors = samples[samples != 0]
    assert torch.allclose(
        survivors.abs().unique().sort().values, (tensor.abs() / density).unique().sort().values
    )


def test_dare_at_density_one_is_the_identity_and_draws_nothing():
    tensor = torch.randn(5)
    state = torch.get_rng_state()
    assert merging.prune_randomly(tensor, 1.0) is tensor
    assert torch.equal(torch.get_rng_state(), state)
    weights = torch.tensor([0.5, -2.0])
    tensors = [tensor, tensor.flip(0)]
    torch.testing.assert_close(
        merging.dare_linear(tensors, weights, 1.0), merging.task_arithmetic(tensors, weights)
    )
    torch.testing.assert_close(merging.dare_ties(tensors, weights, 1.0), merging.ties(tensors, weights, 1.0))


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5])
def test_density_outside_zero_one_is_refused(density):
    with pytest.raises(ValueError, match=r"density=.* must be in \(0, 1\]"):
        merging.prune_by_magnitude(torch.ones(3), density)


def test_svd_of_factor_sum_equals_the_svd_of_the_dense_sum():
    g = torch.Generator().manual_seed(4)
    bs = [torch.randn(30, r, generator=g, dtype=torch.float64) for r in (3, 5)]
    as_ = [torch.randn(r, 20, generator=g, dtype=torch.float64) for r in (3, 5)]
    weights = torch.tensor([0.7, -1.2], dtype=torch.float64)
    dense = weights[0] * bs[0] @ as_[0] + weights[1] * bs[1] @ as_[1]
    u, s, vh = merging.svd_of_factor_sum(bs, as_, weights)
    u_ref, s_ref, vh_ref = merging.svd(dense)
    torch.testing.assert_close(s, s_ref[:8])
    torch.testing.assert_close(u[:, :5], u_ref[:, :5])  # same signs: the convention is fixed
    torch.testing.assert_close(vh[:5], vh_ref[:5])
    torch.testing.assert_close(u @ torch.diag(s) @ vh, dense)


def test_canonical_signs_make_each_left_vector_peak_positive_and_keep_the_product():
    u, s, vh = torch.linalg.svd(
        torch.randn(6, 4, generator=torch.Generator().manual_seed(5)), full_matrices=False
    )
    u2, s2, vh2 = merging.canonical_signs(-u, s, -vh)
    peaks = u2.gather(0, u2.abs().argmax(dim=0, keepdim=True))
    assert (peaks > 0).all()
    torch.testing.assert_close(u2 @ torch.diag(s2) @ vh2, u @ torch.diag(s) @ vh)


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_quantile_matches_torch_quantile(q):
    values = torch.randn(1001, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(merging.quantile(values, q), torch.quantile(values, q))


def test_low_rank_factors_clamp_to_the_quantile_of_both_factors():
    u, s, vh = merging.svd(torch.randn(12, 9, generator=torch.Generator().manual_seed(7)))
    b, a = merging.low_rank_factors(u, s, vh, rank=3, clamp=0.8)
    hi = torch.quantile(torch.cat([(u[:, :3] * s[:3]).flatten(), vh[:3].flatten()]), 0.8)
    assert b.shape == (12, 3) and a.shape == (3, 9)
    assert b.abs().max() <= hi + 1e-6 and a.abs().max() <= hi + 1e-6


# ---- add_weighted_adapter on a model -------------------------------------------------------------
class Mixed(nn.Module):
    """Every layer type LoRA adapts: Embedding, Linear, Conv1d, Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 8)
        self.conv1 = nn.Conv1d(3, 5, 2)
        self.conv2 = nn.Conv2d(3, 6, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.fc1(self.emb(ids))))


ALL = ["emb", "fc1", "fc2", "conv1", "conv2"]
# different ranks, alphas, targets and rsLoRA
ADAPTERS = {
    "one": dict(r=4, lora_alpha=8, target_modules=ALL, use_rslora=True),
    "two": dict(r=2, lora_alpha=3, target_modules=["fc1", "conv2"]),
    "three": dict(r=6, lora_alpha=5, target_modules=["fc2", "emb", "conv1"], use_rslora=True),
}
WEIGHTS = [0.8, -1.5, 0.6]


def _model(adapters=ADAPTERS, seed=0):
    torch.manual_seed(seed)
    names = list(adapters)
    model = lorakit.get_peft_model(Mixed(), lorakit.LoraConfig(**adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lorakit.LoraConfig(**adapters[name]))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return model


def _layers(model, adapter):
    return {
        name.rsplit(".", 1)[-1]: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.r
    }


def _true_change(layer, adapters, weights):
    """sum_i w_i s_i B_i A_i over the adapters this layer holds, in the base weight's layout."""
    return sum(w * layer.get_delta_weight(a) for a, w in zip(adapters, weights) if a in layer.r)


def _best_rank_k(matrix, k):
    flat = matrix.flatten(1)
    u, s, vh = torch.linalg.svd(flat.double(), full_matrices=False)
    return (u[:, :k] * s[:k] @ vh[:k]).float().view_as(matrix), s[k:].square().sum().sqrt().item()


def test_cat_reproduces_the_weighted_sum_of_true_changes_exactly():
    model = _model()
    add_weighted_adapter(model.base_model, list(ADAPTERS), WEIGHTS, "mix", combination_type="cat")
    layers = _layers(model, "mix")
    assert set(layers) == set(ALL)
    for name, layer in layers.items():
        assert layer.r["mix"] == 12 and layer.scaling["mix"] == 1.0
        expected = _true_change(layer, list(ADAPTERS), WEIGHTS)
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("svd_rank", [None, 3, 12])
def test_svd_gives_the_best_rank_k_approximation_of_the_weighted_sum(svd_rank):
    model = _model()
    add_weighted_adapter(model.base_model, list(ADAPTERS), WEIGHTS, "mix", svd_rank=svd_rank)
    k = svd_rank or 6
    for name, layer in _layers(model, "mix").items():
        assert layer.r["mix"] == k and layer.scaling["mix"] == 1.0
        expected, tail = _best_rank_k(_true_change(layer, list(ADAPTERS), WEIGHTS), k)
        actual = layer.get_delta_weight("mix")
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4, msg=name)
        error = (actual - _true_change(layer, list(ADAPTERS), WEIGHTS)).norm().item()
        assert error == pytest.approx(tail, abs=1e-4), name  # Eckart-Young: the smallest possible error


def test_svd_of_rslora_adapters_keeps_their_scale():
    model = _model({"one": ADAPTERS["one"], "three": ADAPTERS["three"]})
    add_weighted_adapter(model.base_model, ["one", "three"], [1.0, 1.0], "mix", svd_rank=10)
    for name, layer in _layers(model, "mix").items():
        expected = _true_change(layer, ["one", "three"], [1.0, 1.0])
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-5, rtol=1e-4, msg=name)


def test_linear_of_one_rslora_adapter_is_its_weighted_change():
    model = _model({"one": ADAPTERS["one"]})
    add_weighted_adapter(model.base_model, ["one"], [-0.7], "mix", combination_type="linear")
    config = model.peft_config["mix"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 4, False)
    for name, layer in _layers(model, "mix").items():
        expected = -0.7 * layer.get_delta_weight("one")
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("dare", "plain"),
    [
        ("dare_linear", "linear"),
        ("dare_ties", "ties"),
        ("dare_linear_svd", "svd"),
        ("dare_ties_svd", "ties_svd"),
    ],
)
def test_dare_at_density_one_equals_its_non_dare_form(dare, plain):
    same_rank = {name: {**config, "r": 4} for name, config in ADAPTERS.items()}
    model = _model(same_rank)
    names = list(same_rank)
    density = {"density": 1.0} if "ties" in plain else {}
    add_weighted_adapter(model.base_model, names, [0.8, 1.5, 0.6], "dare", combination_type=dare, density=1.0)
    add_weighted_adapter(model.base_model, names, [0.8, 1.5, 0.6], "plain", combination_type=plain, **density)
    for name, layer in _layers(model, "dare").items():
        torch.testing.assert_close(
            layer.get_delta_weight("dare"), layer.get_delta_weight("plain"), atol=2e-5, rtol=1e-4, msg=name
        )


def test_new_adapter_config_is_plain_lora_with_scaling_one_on_the_union_of_targets():
    model = _model()
    first = model.peft_config["one"]
    first.rank_pattern, first.alpha_pattern = (
        {"fc1": 4},
        {"fc1": 8},
    )  # same values: no effect, must be cleared
    add_weighted_adapter(model.base_model, list(ADAPTERS), WEIGHTS, "mix", combination_type="cat")
    config = model.peft_config["mix"]
    assert (config.r, config.lora_alpha, config.use_rslora, config.use_dora) == (12, 12, False, False)
    assert config.target_modules == set(ALL)
    assert config.rank_pattern == {} and config.alpha_pattern == {} and config.init_lora_weights is True
    assert model.active_adapters == ["one"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix" in n)


def test_targets_are_full_names_when_the_sources_filter_layers():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(
                nn.ModuleDict({"q": nn.Linear(6, 6), "v": nn.Linear(6, 6)}) for _ in range(3)
            )

    model = lorakit.get_peft_model(
        Stack(),
        lorakit.LoraConfig(r=2, target_modules=["q"], layers_to_transform=[0], layers_pattern="layers"),
    )
    model.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["v"]))
    add_weighted_adapter(model.base_model, ["default", "other"], [1.0, 1.0], "mix", combination_type="cat")
    expected = {"layers.0.q", "layers.0.v", "layers.1.v", "layers.2.v"}
    config = model.peft_config["mix"]
    assert config.target_modules == expected and config.layers_to_transform is None
    adapted = {n for n, m in model.get_base_model().named_modules() if getattr(m, "r", {}).get("mix")}
    assert adapted == expected


def test_modules_to_save_copy_of_the_source_adapter_is_carried_over():
    model = _model({"one": {**ADAPTERS["one"], "modules_to_save": ["head"]}, "two": ADAPTERS["two"]})
    head = model.get_base_model().head
    with torch.no_grad():
        head.modules_to_save["one"].weight.add_(1.0)
    add_weighted_adapter(model.base_model, ["one", "two"], [1.0, 1.0], "mix", combination_type="cat")
    assert torch.equal(head.modules_to_save["mix"].weight, head.modules_to_save["one"].weight)
    assert model.peft_config["mix"].modules_to_save == ["head"]


def test_lora_bias_is_combined_as_the_weighted_sum_of_scaled_biases():
    model = _model(
        {"one": {**ADAPTERS["one"], "target_modules": ["fc1"], "lora_bias": True}, "two": ADAPTERS["two"]}
    )
    add_weighted_adapter(model.base_model, ["one", "two"], [0.5, 2.0], "mix", combination_type="cat")
    layer = _layers(model, "mix")["fc1"]
    torch.testing.assert_close(layer.get_delta_bias("mix"), 0.5 * layer.get_delta_bias("one"))


def test_svd_rank_above_the_layer_size_pads_with_zeros_and_stays_exact():
    model = _model()
    add_weighted_adapter(model.base_model, list(ADAPTERS), WEIGHTS, "mix", svd_rank=30)
    ids = torch.tensor([[1, 2, 3]])
    model.set_adapter("mix")
    model(ids)  # shapes are consistent
    for name, layer in _layers(model, "mix").items():
        expected = _true_change(layer, list(ADAPTERS), WEIGHTS)
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=2e-5, rtol=1e-4, msg=name)


def test_svd_driver_is_ignored_with_a_warning_on_cpu():
    model = _model()
    with pytest.warns(UserWarning, match="svd_driver='gesvd' .* ignored"):
        add_weighted_adapter(
            model.base_model, list(ADAPTERS), WEIGHTS, "mix", svd_driver="gesvd", progressbar=True
        )
    assert "mix" in model.peft_config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(adapters=["one", "nope"]), r"Unknown adapter\(s\) \['nope'\]"),
        (dict(adapter_name="two"), "'two' already exists"),
        (dict(combination_type="average"), "combination_type='average' is unknown"),
        (dict(combination_type="linear"), r"needs one rank per module.*'cat'.*'svd'.*'ties_svd'"),
        (dict(combination_type="ties", density=0.5), "needs one rank per module"),
        (dict(combination_type="ties_svd"), "needs density"),
        (dict(combination_type="ties_svd", density=0.0), r"density=0.0 must be in \(0, 1\]"),
        (dict(combination_type="dare_linear_svd", density=1.5), r"density=1.5 must be in \(0, 1\]"),
        (dict(weights=[1.0, 2.0]), "Got 2 weights for 3 adapters"),
        (dict(svd_clamp=1.5), "svd_clamp=1.5 must be a quantile"),
        (dict(svd_rank=0), "svd_rank=0 must be a positive integer"),
        (dict(majority_sign_method="mean"), "majority_sign_method='mean'"),
        (dict(svd_driver="lapack"), "svd_driver='lapack' is not"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_unchanged(kwargs, message):
    model = _model()
    before = state_snapshot(model)
    call = {"adapters": list(ADAPTERS), "weights": WEIGHTS, "adapter_name": "mix", **kwargs}
    with pytest.raises(ValueError, match=message):
        add_weighted_adapter(model.base_model, **call)
    assert_same_state(before, state_snapshot(model))
    assert list(model.peft_config) == list(ADAPTERS)


def test_dora_adapters_are_refused_by_name():
    model = _model({"one": ADAPTERS["one"], "dora": {**ADAPTERS["two"], "use_dora": True}})
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="Adapter 'dora' is a DoRA adapter"):
        add_weighted_adapter(model.base_model, ["one", "dora"], [1.0, 1.0], "mix")
    assert_same_state(before, state_snapshot(model))


def test_two_adapters_saving_the_same_module_are_refused():
    model = _model(
        {
            "one": {**ADAPTERS["one"], "modules_to_save": ["head"]},
            "two": {**ADAPTERS["two"], "modules_to_save": ["head"]},
        }
    )
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=r"each train their own copy of 'head'"):
        add_weighted_adapter(model.base_model, ["one", "two"], [1.0, 1.0], "mix")
    assert_same_state(before, state_snapshot(model))


def test_density_is_ignored_with_a_warning_by_forms_that_do_not_prune():
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_weighted_adapter(
            model.base_model, list(ADAPTERS), WEIGHTS, "mix", combination_type="cat", density=0.5
        )
    assert any("density=0.5 has no effect" in str(w.message) for w in caught)


def test_a_lora_bias_next_to_an_embedding_adapter_is_refused():
    model = _model(
        {"one": {**ADAPTERS["one"], "target_modules": ["fc1"], "lora_bias": True}, "three": ADAPTERS["three"]}
    )
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=r"'one' has a lora_bias.*Embedding 'emb'"):
        add_weighted_adapter(model.base_model, ["one", "three"], [1.0, 1.0], "mix", combination_type="cat")
    assert_same_state(before, state_snapshot(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="svd_driver is a CUDA option")
@pytest.mark.parametrize("combination_type", ["svd", "ties_svd"])
def test_svd_driver_is_used_on_cuda(combination_type):
    model = _model().cuda()
    density = 0.5 if combination_type == "ties_svd" else None
    for name, driver in (("plain", None), ("gesvdj", "gesvdj")):
        add_weighted_adapter(
            model.base_model,
            list(ADAPTERS),
            WEIGHTS,
            name,
            combination_type,
            svd_driver=driver,
            density=density,
        )
    for name, layer in _layers(model, "plain").items():
        torch.testing.assert_close(
            layer.get_delta_weight("gesvdj"), layer.get_delta_weight("plain"), atol=1e-4, rtol=1e-3, msg=name
        )
