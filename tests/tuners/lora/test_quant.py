"""Blockwise quantization and LoftQ, checked against their definitions.

References are computed naively here (a Python loop over blocks, argmin over every level, a full
SVD), never copied from a previous run; the only constants are QLoRA's published NF4 values.
"""

import math

import pytest
import torch

from lorakit.quant import (
    QuantizedTensor,
    dequantize,
    loftq_init,
    loftq_weight_error,
    nf_codebook,
    quantize,
    uniform_codebook,
)

# QLoRA's NF4 table (Dettmers et al. 2023, Appendix E), the reference for nf_codebook(4).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return ((reference.float() - approx.float()).norm() / reference.float().norm()).item()


def decaying_spectrum_matrix(seed: int = 0) -> torch.Tensor:
    """128 x 256 with singular values exp(-i / 4), i = 0..127, plus N(0, 1e-3^2) noise."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(128, 128, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(256, 128, generator=generator))
    spectrum = torch.exp(-torch.arange(128) / 4)
    return (left * spectrum) @ right.T + 1e-3 * torch.randn(128, 256, generator=generator)


def reference_dequantize(weight: torch.Tensor, levels: torch.Tensor, block_size: int):
    """absmax(block) * nearest level(value / absmax), one block at a time, by argmin over levels.

    Returns the reference values (weight's shape, float32) and a mask of near-ties, values whose two
    nearest levels are within 1e-6 of equally far (either answer is then correct).
    """
    flat = weight.float().flatten()
    values = torch.empty_like(flat)
    near_tie = torch.zeros_like(flat, dtype=torch.bool)
    for start in range(0, flat.numel(), block_size):
        block = flat[start : start + block_size]
        absmax = block.abs().max()
        normalized = block / absmax if absmax > 0 else block
        distance = (normalized[:, None] - levels[None, :]).abs()
        nearest_two = distance.topk(2, dim=1, largest=False).values
        values[start : start + block_size] = absmax * levels[distance.argmin(dim=1)]
        near_tie[start : start + block_size] = nearest_two[:, 1] - nearest_two[:, 0] < 1e-6
    return values.reshape(weight.shape), near_tie.reshape(weight.shape)


# ---- codebooks ----------------------------------------------------------------------------------
def test_nf4_codebook_matches_published_qlora_values():
    torch.testing.assert_close(nf_codebook(4), torch.tensor(PUBLISHED_NF4), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", range(2, 9))
def test_nf_codebook_is_sorted_asymmetric_with_exact_zero_and_unit_endpoints(bits):
    levels = nf_codebook(bits)
    assert levels.shape == (2**bits,) and levels.dtype == torch.float32
    assert bool((levels[1:] > levels[:-1]).all()), levels
    assert levels[0].item() == -1.0 and levels[-1].item() == 1.0
    assert (levels == 0).sum().item() == 1
    assert (levels < 0).sum().item() == 2 ** (bits - 1) - 1  # the zero is shared by both sides
    assert (levels > 0).sum().item() == 2 ** (bits - 1)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_uniform_codebook_is_evenly_spaced_from_minus_one_to_one(bits):
    expected = torch.tensor([-1 + 2 * i / (2**bits - 1) for i in range(2**bits)])
    torch.testing.assert_close(uniform_codebook(bits), expected, atol=1e-7, rtol=0)


# ---- blockwise quantization ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "bits", "shape", "block_size"),
    [
        ("nf", 4, (37, 29), 64),  # 1073 values: the last block holds 49
        ("nf", 2, (8, 64), 64),
        ("nf", 8, (5, 7, 11), 16),
        ("uniform", 2, (37, 29), 64),
        ("uniform", 4, (1000,), 128),
        ("uniform", 8, (37, 29), 32),
    ],
)
def test_dequantized_value_is_block_absmax_times_nearest_level(method, bits, shape, block_size):
    weight = gaussian(*shape) * torch.linspace(0.1, 3.0, shape[-1])  # blocks of different scales
    q = quantize(weight, bits=bits, method=method, block_size=block_size)
    levels = nf_codebook(bits) if method == "nf" else uniform_codebook(bits)
    expected, near_tie = reference_dequantize(weight, levels, block_size)

    assert q.codes.dtype == torch.uint8
    assert q.codes.shape == (math.ceil(weight.numel() / block_size), block_size)
    restored = dequantize(q)
    mismatch = (restored != expected) & ~near_tie
    assert not bool(mismatch.any()), (
        f"{int(mismatch.sum())} values differ from the definition, "
        f"e.g. {restored[mismatch][:5].tolist()} vs {expected[mismatch][:5].tolist()}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5, 7), (130,), ()])
def test_dequantize_restores_shape_and_dtype(dtype, shape):
    weight = gaussian(*shape).to(dtype)
    restored = dequantize(quantize(weight, block_size=64))
    assert restored.shape == weight.shape and restored.dtype == dtype
    expected, near_tie = reference_dequantize(weight, nf_codebook(4), 64)
    torch.testing.assert_close(restored[~near_tie], expected.to(dtype)[~near_tie], atol=0, rtol=0)


@pytest.mark.parametrize(("method", "bits"), [("nf", 4), ("uniform", 2), ("uniform", 8)])
def test_all_zero_blocks_dequantize_to_exact_zeros(method, bits):
    weight = gaussian(4, 64)
    weight[1] = 0.0  # a whole block of zeros
    weight = torch.cat([weight.flatten(), torch.zeros(10)])  # and a zero, padded last block
    q = quantize(weight, bits=bits, method=method, block_size=64)
    restored = dequantize(q)
    assert q.absmax[1].item() == 0.0 and q.absmax[4].item() == 0.0
    assert bool(torch.isfinite(restored).all())
    assert bool((restored[64:128] == 0).all()) and bool((restored[256:] == 0).all())
    assert bool((dequantize(quantize(torch.zeros(3, 100), bits=bits, method=method)) == 0).all())
    levels = nf_codebook(bits) if method == "nf" else uniform_codebook(bits)
    zero_block_levels = levels[q.codes[1].long()]  # zeros code as the level nearest zero, not 0/0
    assert bool((zero_block_levels.abs() == levels.abs().min()).all()), zero_block_levels


def test_quantize_returns_a_quantized_tensor_describing_the_input():
    weight = gaussian(10, 20).half()
    q = quantize(weight, bits=3, method="uniform", block_size=32)
    assert isinstance(q, QuantizedTensor)
    assert (q.shape, q.dtype, q.method, q.bits, q.block_size) == (
        weight.shape,
        torch.float16,
        "uniform",
        3,
        32,
    )
    assert q.absmax.shape == (7,) and q.absmax.dtype == torch.float32
    assert int(q.codes.max()) < 2**3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, r"bits=1 is not supported; use an int from 2 to 8"),
        ({"bits": 9}, r"bits=9 is not supported"),
        ({"bits": 4.0}, r"bits=4.0 is not supported"),
        ({"method": "int4"}, r"method='int4' is not supported; use one of \('nf', 'uniform'\)"),
        ({"block_size": 0}, r"block_size=0 must be a positive int"),
    ],
)
def test_quantize_rejects_bad_arguments_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize(gaussian(4, 4), **kwargs)


def test_quantize_rejects_integer_and_non_finite_weights():
    with pytest.raises(ValueError, match=r"dtype torch.int64; pass a floating tensor"):
        quantize(torch.arange(8))
    weight = gaussian(4, 4)
    weight[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"inf or nan"):
        quantize(weight)


def test_quantization_error_orders_8bit_uniform_below_nf4_below_2bit_uniform():
    weight = gaussian(256, 256)
    errors = {
        (method, bits): relative_error(weight, dequantize(quantize(weight, bits=bits, method=method)))
        for method, bits in [("uniform", 8), ("nf", 4), ("uniform", 2)]
    }
    assert errors[("uniform", 8)] < errors[("nf", 4)] < errors[("uniform", 2)], errors


def test_nf4_beats_uniform_4bit_on_gaussian_weights():
    weight = gaussian(256, 256, seed=1)
    nf4 = relative_error(weight, dequantize(quantize(weight, bits=4, method="nf")))
    uniform4 = relative_error(weight, dequantize(quantize(weight, bits=4, method="uniform")))
    assert nf4 < uniform4, f"nf4 error {nf4:.4f} vs uniform 4-bit {uniform4:.4f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantize_on_cuda_matches_cpu():
    weight = gaussian(37, 29)
    on_cpu, on_cuda = quantize(weight), quantize(weight.cuda())
    assert torch.equal(on_cpu.codes, on_cuda.codes.cpu())
    torch.testing.assert_close(dequantize(on_cpu), dequantize(on_cuda).cpu(), atol=0, rtol=0)


# ---- LoftQ --------------------------------------------------------------------------------------
def test_loftq_one_iteration_holds_the_plain_quantized_weight_as_base():
    weight = decaying_spectrum_matrix()
    base, _, _ = loftq_init(weight, r=8, scaling=2.0, iters=1)
    assert torch.equal(base, dequantize(quantize(weight)))


def test_loftq_scaling_times_b_a_is_the_rank_r_svd_of_the_quantization_residual():
    weight, r, scaling = decaying_spectrum_matrix(), 8, 0.25
    base, lora_a, lora_b = loftq_init(weight, r=r, scaling=scaling, iters=3)
    assert lora_a.shape == (r, 256) and lora_b.shape == (128, r)
    u, s, vh = torch.linalg.svd(weight - base, full_matrices=False)
    torch.testing.assert_close(scaling * lora_b @ lora_a, (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5, rtol=0)
    # the split is balanced: B^T B = A A^T = diag(S[:r]) / scaling
    torch.testing.assert_close(lora_b.T @ lora_b, torch.diag(s[:r]) / scaling, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_a @ lora_a.T, torch.diag(s[:r]) / scaling, atol=1e-5, rtol=1e-5)


def test_loftq_correction_removes_the_top_r_energy_of_the_quantization_error():
    """With one iteration, error(Q + sBA) / error(Q) = sqrt(sum_{i>r} sigma_i^2 / sum_i sigma_i^2)
    of W - Q (Eckart-Young); more iterations then lower the error further on this matrix."""
    weight, r, scaling = decaying_spectrum_matrix(), 8, 2.0
    base, lora_a, lora_b = loftq_init(weight, r=r, scaling=scaling, iters=1)
    quantized_only = relative_error(weight, base)
    with_correction = loftq_weight_error(weight, base, lora_a, lora_b, scaling)
    sigma = torch.linalg.svdvals(weight - base)
    tail_fraction = math.sqrt((sigma[r:] ** 2).sum() / (sigma**2).sum())
    assert with_correction / quantized_only == pytest.approx(tail_fraction, rel=1e-4)

    four_iters = loftq_weight_error(weight, *loftq_init(weight, r=r, scaling=scaling, iters=4), scaling)
    ratios = f"Q alone {quantized_only:.4f}, LoftQ T=1 {with_correction:.4f}, T=4 {four_iters:.4f}"
    assert with_correction / quantized_only < 0.92, ratios
    assert four_iters / quantized_only < 0.85, ratios


def test_loftq_more_iterations_do_not_increase_error_at_4_bits():
    """Not a theorem: the SVD step is optimal for a fixed Q, but re-quantizing W - sBA moves the
    absmax scales, so at 2-3 bits the error often rises after a few iterations. On this NF4
    decaying-spectrum matrix it falls monotonically."""
    weight = decaying_spectrum_matrix()
    errors = [
        loftq_weight_error(weight, *loftq_init(weight, r=8, scaling=2.0, iters=iters), 2.0)
        for iters in (1, 2, 4, 8)
    ]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:])), errors


def test_loftq_computes_and_returns_float32_for_half_precision_weights():
    weight = decaying_spectrum_matrix().bfloat16()
    base, lora_a, lora_b = loftq_init(weight, r=4, scaling=1.0)
    assert base.dtype == lora_a.dtype == lora_b.dtype == torch.float32
    assert torch.equal(base, dequantize(quantize(weight.float())))


def test_loftq_weight_error_is_the_relative_frobenius_error():
    weight, base = gaussian(6, 5), gaussian(6, 5, seed=1)
    lora_a, lora_b = gaussian(2, 5, seed=2), gaussian(6, 2, seed=3)
    expected = torch.sqrt(((weight - base - 0.5 * lora_b @ lora_a) ** 2).sum() / (weight**2).sum())
    assert loftq_weight_error(weight, base, lora_a, lora_b, 0.5) == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("shape", "kwargs", "message"),
    [
        ((8,), {}, r"weight must be 2-D \(out, in\); got shape \(8,\)"),
        ((8, 4), {"r": 0}, r"r=0 must be in 1..4 for a weight of shape \(8, 4\); lower r"),
        ((8, 4), {"r": 5}, r"r=5 must be in 1..4"),
        ((8, 4), {"scaling": 0.0}, r"scaling=0.0 must be > 0"),
        ((8, 4), {"iters": 0}, r"iters=0 must be >= 1"),
        ((8, 4), {"bits": 9}, r"bits=9 is not supported"),
    ],
)
def test_loftq_rejects_bad_arguments_with_the_fix(shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        loftq_init(gaussian(*shape), **{"r": 2, "scaling": 1.0, **kwargs})


def test_loftq_more_iterations_never_increase_error_even_at_2_bits():
    """Where re-quantizing alone would raise the error (NF2), the best iterate is kept."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(128, 128))
    v, _ = torch.linalg.qr(torch.randn(256, 128))
    weight = (u * torch.exp(-torch.arange(128.0) / 4)) @ v.t() + 1e-3 * torch.randn(128, 256)
    errors = [
        loftq_weight_error(
            weight, *loftq_init(weight, r=8, scaling=2.0, bits=2, iters=t, method="nf"), scaling=2.0
        )
        for t in (1, 2, 4, 8)
    ]
    assert all(later <= earlier + 1e-7 for earlier, later in zip(errors, errors[1:])), errors
