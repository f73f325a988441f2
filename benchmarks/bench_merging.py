"""add_weighted_adapter benchmark: lorakit against PEFT on a small Llama on CPU.

Three LoRA adapters (r=16, alpha=32, on q/k/v/o/gate/up/down of every decoder layer) with the same
seeded weights in both libraries are combined into a fourth with `svd`, `cat`, `linear` and
`ties_svd` (density 0.5). Each repetition times one `add_weighted_adapter` call per library, in
alternating order, then deletes the new adapter (untimed); the ratio reported is the median of the
per-repetition PEFT/lorakit ratios, so drifts in machine load hit both sides alike. Before timing,
the new adapters' weight changes are compared between the libraries (the run aborts if they differ).

lorakit is called as `lorakit.tuners.lora.weighted.add_weighted_adapter(model.base_model, ...)`, the function
behind `PeftModel.add_weighted_adapter`.

Usage: python benchmarks/bench_merging.py [--reps N] [--threads T] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.tuners.lora.weighted import add_weighted_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = ["one", "two", "three"]
WEIGHTS = [0.6, 0.3, 0.8]
CASES = {
    "svd": dict(combination_type="svd"),
    "cat": dict(combination_type="cat"),
    "linear": dict(combination_type="linear"),
    "ties_svd": dict(combination_type="ties_svd", density=0.5),
}
FULL_SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8)
QUICK_SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per case (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all)")
    parser.add_argument("--rank", type=int, default=16, help="rank of each source adapter (default 16)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 reps: a smoke test")
    return parser.parse_args(argv)


def build(lib, base: torch.nn.Module, rank: int, weights: dict[str, torch.Tensor] | None):
    """`base` wrapped by `lib` with three adapters; their weights are seeded (or copied from `weights`)."""
    model = lib.get_peft_model(
        copy.deepcopy(base), lib.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS), ADAPTERS[0]
    )
    for name in ADAPTERS[1:]:
        model.add_adapter(name, lib.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if weights is None:
        gen = torch.Generator().manual_seed(1)
        weights = {
            n: torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5 for n, p in sorted(params.items())
        }
    if set(weights) != set(params):
        sys.exit("abort: the two libraries name their adapter parameters differently")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    return model, weights


def combine(lib, model, case: dict) -> float:
    """Seconds one add_weighted_adapter call takes."""
    start = time.perf_counter()
    if lib is peft:
        model.add_weighted_adapter(ADAPTERS, WEIGHTS, "mix", **case)
    else:
        add_weighted_adapter(model.base_model, ADAPTERS, WEIGHTS, "mix", **case)
    return time.perf_counter() - start


def changes(model) -> dict[str, torch.Tensor]:
    return {
        name: module.get_delta_weight("mix")
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "mix" in module.lora_A
    }


def check_same(models: dict, case_name: str) -> float:
    """Largest relative difference between the two libraries' new weight changes; abort above 1e-3."""
    expected, actual = changes(models[peft]), changes(models[lorakit])
    if set(expected) != set(actual):
        sys.exit(f"abort: {case_name}: the new adapters sit on different modules")
    worst = max(((actual[n] - d).norm() / d.norm()).item() for n, d in expected.items())
    if worst > 1e-3:
        sys.exit(f"abort: {case_name}: weight changes differ (relative {worst:.2e})")
    return worst


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 2 if args.quick else args.reps
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=1000, **shape)).eval()
    models = {}
    models[lorakit], weights = build(lorakit, base, args.rank, None)
    models[peft], _ = build(peft, base, args.rank, weights)

    rows = []
    for case_name, case in CASES.items():
        times: dict = {peft: [], lorakit: []}
        difference = None
        for rep in range(reps + 1):  # rep 0 warms up and checks the results
            order = (peft, lorakit) if rep % 2 else (lorakit, peft)
            for lib in order:
                elapsed = combine(lib, models[lib], case)
                if rep:
                    times[lib].append(elapsed)
            if rep == 0:
                difference = check_same(models, case_name)
            for lib in order:
                models[lib].delete_adapter("mix")
        ratios = [p / k for p, k in zip(times[peft], times[lorakit])]
        medians = statistics.median(times[peft]), statistics.median(times[lorakit])
        rows.append((case_name, *medians, statistics.median(ratios), min(ratios), max(ratios), difference))

    modules = len(TARGETS) * shape["num_hidden_layers"]
    print(
        f"\nadd_weighted_adapter, {len(ADAPTERS)} adapters r={args.rank} on {modules} modules "
        f"(hidden {shape['hidden_size']}, FFN {shape['intermediate_size']}, {shape['num_hidden_layers']} layers), "
        f"{reps} reps, {torch.get_num_threads()} threads, torch {torch.__version__}, peft {peft.__version__}\n"
    )
    print("| combination | PEFT (ms) | lorakit (ms) | PEFT / lorakit (median) | range | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for name, pf, lk, ratio, low, high, diff in rows:
        print(
            f"| {name} | {pf * 1e3:.1f} | {lk * 1e3:.1f} | {ratio:.1f}x | {low:.1f}-{high:.1f}x | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
