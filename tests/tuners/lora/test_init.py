"""Init strategies (`lorakit.init`) against their definitions, and against PEFT 0.21.2 as an oracle."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.init import convert_to_plain_lora, converted_rank_and_alpha, gaussian_a, olora_init, pissa_init

# (scaling, label): plain alpha/r with alpha != r, rsLoRA alpha/sqrt(r) for r=6, and below one
SCALINGS = [(16 / 6, "alpha/r"), (16 / math.sqrt(6), "alpha/sqrt(r)"), (0.25, "small")]


def random_weight(out_features: int, in_features: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)


def decaying_spectrum_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Singular values 1 / i^1.5 plus Gaussian noise of spectral norm ~2e-4 (sigma_16 is 1.6e-2)."""
    generator = torch.Generator().manual_seed(seed)
    k = min(out_features, in_features)
    left = torch.linalg.qr(torch.randn(out_features, k, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(in_features, k, generator=generator, dtype=torch.float64)).Q
    singular_values = torch.arange(1, k + 1, dtype=torch.float64) ** -1.5
    noise = 1e-4 * torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    return ((left * singular_values) @ right.T + noise / math.sqrt(out_features)).float()


def best_rank_r(weight: torch.Tensor, r: int) -> torch.Tensor:
    """Eckart-Young reference, computed in float64."""
    left, singular_values, right_h = torch.linalg.svd(weight.double(), full_matrices=False)
    return (left[:, :r] * singular_values[:r]) @ right_h[:r]


def assert_reconstructs(weight, lora_a, lora_b, new_weight, scaling, rel_tol=1e-5):
    """new_W + scaling * B @ A == W, up to float32 rounding relative to ||W||."""
    rebuilt = new_weight.double() + scaling * (lora_b.double() @ lora_a.double())
    error = torch.linalg.norm(rebuilt - weight.double())
    assert error <= rel_tol * torch.linalg.norm(weight.double()), error


# ---------------------------------------------------------------- PiSSA


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
@pytest.mark.parametrize("scaling", [s for s, _ in SCALINGS], ids=[label for _, label in SCALINGS])
def test_pissa_exact_keeps_the_weight_and_moves_the_best_rank_r_part_into_the_adapter(scaling, shape):
    weight = random_weight(*shape)
    original = weight.clone()
    lora_a, lora_b, new_weight = pissa_init(weight, 6, scaling)

    assert torch.equal(weight, original), "pissa_init modified its input"
    assert lora_a.shape == (6, shape[1]) and lora_b.shape == (shape[0], 6) and new_weight.shape == shape
    assert_reconstructs(weight, lora_a, lora_b, new_weight, scaling)
    reference = best_rank_r(weight, 6)
    adapter_part = scaling * (lora_b.double() @ lora_a.double())
    assert torch.linalg.norm(adapter_part - reference) <= 1e-5 * torch.linalg.norm(reference)


def test_pissa_splits_the_singular_values_evenly_between_orthogonal_factors():
    weight = random_weight(24, 40)
    scaling = 16 / 6
    lora_a, lora_b, _ = pissa_init(weight, 6, scaling)

    expected = torch.diag(torch.linalg.svdvals(weight.double())[:6] / scaling)
    torch.testing.assert_close(lora_a.double() @ lora_a.double().T, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_b.double().T @ lora_b.double(), expected, atol=1e-5, rtol=1e-5)


def relative_difference(part: torch.Tensor, reference: torch.Tensor) -> float:
    return (
        torch.linalg.norm(part.double() - reference.double()) / torch.linalg.norm(reference.double())
    ).item()


@pytest.mark.parametrize("shape", [(512, 384), (384, 512)], ids=["tall", "wide"])
def test_pissa_niter_rank_r_part_is_closer_to_the_exact_one_than_svd_lowrank_without_oversampling(shape):
    # PEFT calls torch.svd_lowrank(W, q=r, niter) (no oversampling); pissa_init sketches r + 4
    # directions. Measured on 12 weights (seeds 0-5, both shapes), niter=4: relative difference of the
    # rank-16 parts 2.1e-4 to 3.3e-3 against svd_lowrank's 3.4e-3 to 2.1e-2, 6-61x closer.
    scaling = 2.0
    for seed in range(3):
        weight = decaying_spectrum_weight(*shape, seed=seed)
        exact_a, exact_b, _ = pissa_init(weight, 16, scaling)
        fast_a, fast_b, fast_new_weight = pissa_init(
            weight, 16, scaling, niter=4, generator=torch.Generator().manual_seed(seed)
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            left, singular_values, right = torch.svd_lowrank(weight, q=16, niter=4)

        exact_part = exact_b.double() @ exact_a.double()
        fast_error = relative_difference(fast_b.double() @ fast_a.double(), exact_part)
        lowrank_error = relative_difference((left * singular_values) @ right.T / scaling, exact_part)
        assert 4 * fast_error < lowrank_error, (seed, fast_error, lowrank_error)
        assert_reconstructs(weight, fast_a, fast_b, fast_new_weight, scaling)
        gram = fast_a.double() @ fast_a.double().T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=["tall", "wide"])
def test_pissa_niter_converges_to_the_exact_rank_r_part(shape):
    # the subspace iteration converges: after 20 power iterations only float32 rounding is left
    weight = random_weight(*shape)
    exact_a, exact_b, _ = pissa_init(weight, 6, 1.0)
    fast_a, fast_b, _ = pissa_init(weight, 6, 1.0, niter=20, generator=torch.Generator().manual_seed(0))
    assert relative_difference(fast_b @ fast_a, exact_b @ exact_a) < 1e-4


def test_pissa_niter_is_reproducible_from_a_generator():
    weight = random_weight(48, 32)
    first = pissa_init(weight, 4, 1.0, niter=2, generator=torch.Generator().manual_seed(3))
    second = pissa_init(weight, 4, 1.0, niter=2, generator=torch.Generator().manual_seed(3))
    for x, y in zip(first, second):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- OLoRA


@pytest.mark.parametrize("scaling", [s for s, _ in SCALINGS], ids=[label for _, label in SCALINGS])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_olora_gives_orthonormal_b_triangular_a_and_keeps_the_weight(scaling, shape):
    weight = random_weight(*shape)
    original = weight.clone()
    lora_a, lora_b, new_weight = olora_init(weight, 6, scaling)

    assert torch.equal(weight, original), "olora_init modified its input"
    assert lora_a.shape == (6, shape[1]) and lora_b.shape == (shape[0], 6)
    torch.testing.assert_close(lora_b.T @ lora_b, torch.eye(6), atol=1e-5, rtol=0)
    assert torch.equal(lora_a, torch.triu(lora_a)), "A is not upper triangular"
    assert_reconstructs(weight, lora_a, lora_b, new_weight, scaling)


# ---------------------------------------------------------------- dtypes and errors


@pytest.mark.parametrize("init", [olora_init, pissa_init])
def test_half_precision_weight_gives_float32_factors_and_a_residual_in_its_own_dtype(init):
    weight = random_weight(24, 40, dtype=torch.bfloat16)
    lora_a, lora_b, new_weight = init(weight, 6, 2.0)

    assert lora_a.dtype == lora_b.dtype == torch.float32 and new_weight.dtype == torch.bfloat16
    # one bfloat16 rounding of the residual (8 significant bits) is all that is lost
    assert_reconstructs(weight, lora_a, lora_b, new_weight, 2.0, rel_tol=4e-3)


@pytest.mark.parametrize("init", [olora_init, pissa_init])
def test_float64_weight_is_computed_in_float64(init):
    weight = random_weight(24, 40, dtype=torch.float64)
    lora_a, lora_b, new_weight = init(weight, 6, 2.0)

    assert lora_a.dtype == lora_b.dtype == new_weight.dtype == torch.float64
    assert_reconstructs(weight, lora_a, lora_b, new_weight, 2.0, rel_tol=1e-13)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: pissa_init(random_weight(8, 6), 7, 1.0), ValueError, "r=7"),
        (lambda: olora_init(random_weight(8, 6), 0, 1.0), ValueError, "r=0"),
        (lambda: olora_init(torch.randn(4, 3, 3), 2, 1.0), ValueError, "(4, 3, 3)"),
        (lambda: pissa_init(torch.ones(8, 6, dtype=torch.int64), 2, 1.0), TypeError, "torch.int64"),
        (lambda: pissa_init(random_weight(8, 6), 2, -1.0), ValueError, "scaling=-1.0"),
        (lambda: pissa_init(random_weight(8, 6), 2, 1.0, niter=-1), ValueError, "-1"),
        (lambda: gaussian_a(0, 5), ValueError, "r=0"),
    ],
    ids=[
        "pissa-r-too-big",
        "olora-r-zero",
        "not-2d",
        "integer-weight",
        "negative-scaling",
        "negative-niter",
        "gaussian-r",
    ],
)
def test_bad_arguments_raise_with_the_offending_value(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


# ---------------------------------------------------------------- gaussian


def test_gaussian_a_has_std_one_over_r_and_follows_its_generator():
    lora_a = gaussian_a(4, 20_000, generator=torch.Generator().manual_seed(0))

    assert lora_a.shape == (4, 20_000) and lora_a.dtype == torch.float32
    # 80,000 samples: the std estimate is within ~0.3% of the truth, the mean within ~1e-3
    assert abs(lora_a.std().item() - 1 / 4) < 0.02 * (1 / 4)
    assert abs(lora_a.mean().item()) < 5e-3
    assert torch.equal(lora_a, gaussian_a(4, 20_000, generator=torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------- conversion to plain LoRA


def test_converted_adapter_on_the_original_weight_equals_the_trained_one_on_the_residual():
    generator = torch.Generator().manual_seed(0)
    out_features, in_features, r, scaling = 10, 7, 3, 16 / 3
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    a0, a1 = (torch.randn(r, in_features, generator=generator, dtype=torch.float64) for _ in range(2))
    b0, b1 = (torch.randn(out_features, r, generator=generator, dtype=torch.float64) for _ in range(2))
    residual = weight - scaling * b0 @ a0

    lora_a, lora_b = convert_to_plain_lora(a0, b0, a1, b1)

    assert lora_a.shape == (2 * r, in_features) and lora_b.shape == (out_features, 2 * r)
    torch.testing.assert_close(
        weight + scaling * lora_b @ lora_a, residual + scaling * b1 @ a1, atol=1e-12, rtol=0
    )


def test_convert_to_plain_lora_rejects_factors_of_different_ranks():
    a0, b0 = torch.zeros(3, 7), torch.zeros(10, 3)
    with pytest.raises(ValueError, match=r"a1 \(4, 7\)"):
        convert_to_plain_lora(a0, b0, torch.zeros(4, 7), torch.zeros(10, 4))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_converted_rank_and_alpha_keep_the_scaling(use_rslora):
    def scaling(r, alpha):
        return alpha / math.sqrt(r) if use_rslora else alpha / r

    for r, alpha in [(4, 16), (8, 8), (3, 5.5)]:
        new_r, new_alpha = converted_rank_and_alpha(r, alpha, use_rslora)
        assert new_r == 2 * r
        assert math.isclose(scaling(new_r, new_alpha), scaling(r, alpha), rel_tol=1e-12)


# ---------------------------------------------------------------- PEFT 0.21.2 as oracle


def peft_linear(weight: torch.Tensor, init: str, r: int, alpha: float, use_rslora: bool):
    """Wrap `nn.Linear(weight)` with PEFT; return (peft model, its LoRA layer)."""
    import peft

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=init, use_rslora=use_rslora
    )
    model = peft.get_peft_model(nn.Sequential(linear), config)
    return model, model.base_model.model[0]


def peft_factors(layer):
    return (
        layer.lora_A["default"].weight.detach().float().clone(),
        layer.lora_B["default"].weight.detach().float().clone(),
        layer.base_layer.weight.detach().clone(),
        layer.scaling["default"],
    )


def as_peft_stores(factor: torch.Tensor, base_dtype: torch.dtype) -> torch.Tensor:
    """PEFT computes the residual from float32 factors, then rounds the factors to the base dtype
    (and autocasts them back to float32): for a bfloat16 base its A and B are bfloat16 values, while
    lorakit keeps the float32 ones, which reconstruct W more closely."""
    return factor.to(base_dtype).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
def test_olora_stores_what_peft_stores(use_rslora, dtype):
    weight = random_weight(12, 20, dtype=dtype)
    peft_a, peft_b, peft_residual, scaling = peft_factors(peft_linear(weight, "olora", 4, 16, use_rslora)[1])
    assert scaling == (16 / 2 if use_rslora else 16 / 4)

    lora_a, lora_b, new_weight = olora_init(weight, 4, scaling)
    lora_a, lora_b = as_peft_stores(lora_a, dtype), as_peft_stores(lora_b, dtype)

    # same matrix, same Householder QR: identical signs, so the factors compare directly
    torch.testing.assert_close(lora_a, peft_a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lora_b, peft_b, atol=1e-6, rtol=1e-6)
    assert new_weight.dtype == peft_residual.dtype
    torch.testing.assert_close(new_weight, peft_residual, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
def test_pissa_adapter_and_residual_match_peft(use_rslora, dtype):
    weight = random_weight(12, 20, dtype=dtype)
    peft_a, peft_b, peft_residual, scaling = peft_factors(peft_linear(weight, "pissa", 4, 16, use_rslora)[1])

    lora_a, lora_b, new_weight = pissa_init(weight, 4, scaling)
    lora_a, lora_b = as_peft_stores(lora_a, dtype), as_peft_stores(lora_b, dtype)

    # singular vectors are defined up to sign: compare the product and the residual
    torch.testing.assert_close(lora_b @ lora_a, peft_b @ peft_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_a @ lora_a.T, peft_a @ peft_a.T, atol=1e-5, rtol=1e-5)
    assert new_weight.dtype == peft_residual.dtype
    torch.testing.assert_close(new_weight, peft_residual, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
def test_conversion_matches_peft_path_initial_model_for_weight_conversion(tmp_path, use_rslora):
    weight = random_weight(12, 20)
    model, layer = peft_linear(weight, "pissa", 4, 16, use_rslora)
    model.save_pretrained(tmp_path / "init")
    a0, b0, _, _ = peft_factors(layer)
    with torch.no_grad():
        layer.lora_A["default"].weight.add_(
            0.1 * torch.randn(a0.shape, generator=torch.Generator().manual_seed(1))
        )
        layer.lora_B["default"].weight.add_(
            0.1 * torch.randn(b0.shape, generator=torch.Generator().manual_seed(2))
        )
    a1, b1, _, _ = peft_factors(layer)
    model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )

    tensors = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    lora_a, lora_b = convert_to_plain_lora(a0, b0, a1, b1)
    r, alpha = converted_rank_and_alpha(4, 16, use_rslora)

    assert torch.equal(tensors["base_model.model.0.lora_A.weight"], lora_a)
    assert torch.equal(tensors["base_model.model.0.lora_B.weight"], lora_b)
    assert config["r"] == r and math.isclose(config["lora_alpha"], alpha, rel_tol=1e-12)
