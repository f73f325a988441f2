"""Core LoRA benchmark: lorakit against PEFT, side by side, on a small Llama on CPU.

Measures, for LoRA r=16 / alpha=32 on every linear of the decoder layers:

1. training-step time (forward + backward + AdamW step), against the floor of a frozen model's
   forward plus activation-only backward;
2. bytes of tensors saved for backward by one training forward;
3. eval-mode, no-grad forward time of the unmerged wrapped model against the bare model;
4. `merge_and_unload()` time.

Timed sides run interleaved in a rotating order after warm-up, and every ratio is the median of
per-repetition ratios, so drifts in machine load hit both sides of a ratio alike. See README.md.

Usage: python benchmarks/bench_core.py [--reps N] [--threads T] [--dropout P] [--keep-freed-memory]
       [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import ModuleType

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOSS_TOLERANCE = 1e-4
MIB = 2**20


@dataclass(frozen=True)
class Setup:
    """Model and workload shape of one benchmark run."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    batch: int
    seq_len: int
    rank: int
    alpha: int
    dropout: float
    seed: int


FULL_SHAPE = dict(
    hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8, vocab_size=8000, batch=4, seq_len=256
)
QUICK_SHAPE = dict(
    hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, vocab_size=256, batch=2, seq_len=32
)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc returns large freed blocks (and the heap's free top) to the kernel, so a step
    that allocates them again pays a page fault per 4 KiB touched. On the benchmark Llama a step
    paid anywhere from 0 to 32 000 such faults (counted with getrusage), at random, on either side:
    tens of ms of noise. Fixing the mmap threshold at its maximum (32 MiB; blocks up to it come
    from the heap) and the trim threshold at 2 GiB removes that cost from both sides alike. Only
    this benchmark process is affected. Returns False (nothing changed) without glibc's `mallopt`.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 * MIB)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def malloc_mode(keep_freed: bool) -> str:
    """Apply `--keep-freed-memory` if asked; the malloc mode the run's header and JSON record."""
    return "freed memory kept" if keep_freed and keep_freed_memory() else "default"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed repetitions per measurement (default 35; 2 with --quick)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed repetitions per side first (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)"
    )
    p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 reps: a smoke run for CI")
    p.add_argument("--json", metavar="PATH", help="also write all numbers, raw samples included, to PATH")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="have glibc keep freed memory, so no side pays page faults at random (see keep_freed_memory)",
    )
    p.add_argument(
        "--lib-a",
        default="lorakit",
        help="module measured against peft (default lorakit); `--lib-a peft` is an A/A run showing the harness noise",
    )
    args = p.parse_args(argv)
    args.reps = args.reps if args.reps is not None else (2 if args.quick else 35)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    return args


def make_setup(args: argparse.Namespace) -> Setup:
    """The model/workload shape for these arguments."""
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    return Setup(**shape, rank=16, alpha=32, dropout=args.dropout, seed=args.seed)


def build_base(setup: Setup, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A randomly initialised Llama (float32 on CPU by default), seeded, with every weight frozen."""
    torch.manual_seed(setup.seed)
    config = LlamaConfig(
        hidden_size=setup.hidden_size,
        intermediate_size=setup.intermediate_size,
        num_hidden_layers=setup.num_layers,
        num_attention_heads=setup.num_heads,
        num_key_value_heads=setup.num_heads,
        vocab_size=setup.vocab_size,
        max_position_embeddings=max(512, setup.seq_len),
        use_cache=False,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype).requires_grad_(False)
    return model


def wrap(lib: ModuleType, base: torch.nn.Module, setup: Setup) -> torch.nn.Module:
    """A LoRA-wrapped deep copy of `base`, built with `lib`'s PEFT-style API."""
    config = lib.LoraConfig(
        r=setup.rank,
        lora_alpha=setup.alpha,
        lora_dropout=setup.dropout,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )
    return lib.get_peft_model(copy.deepcopy(base), config)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters of `model` that require grad, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_adapter(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded adapter weights for `model`'s trainable parameters, with B nonzero so LoRA changes the output."""
    gen = torch.Generator().manual_seed(seed + 1)
    adapter = {}
    for name, p in sorted(trainable(model).items()):
        if "lora_" not in name:
            sys.exit(f"abort: trainable parameter {name} is not a LoRA parameter")
        std = 0.02 if "lora_B" in name else 1.0 / p.shape[-1] ** 0.5
        adapter[name] = torch.randn(p.shape, generator=gen, dtype=p.dtype) * std
    return adapter


def load_adapter(model: torch.nn.Module, adapter: dict[str, torch.Tensor]) -> None:
    """Copy `adapter` into `model`'s trainable parameters; abort unless the names match exactly."""
    params = trainable(model)
    if set(params) != set(adapter):
        missing, extra = sorted(set(adapter) - set(params)), sorted(set(params) - set(adapter))
        sys.exit(f"abort: adapter names differ; missing {missing[:3]}..., unexpected {extra[:3]}...")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(adapter[name])


def make_batch(setup: Setup) -> torch.Tensor:
    """Seeded random token ids of shape (batch, seq_len)."""
    gen = torch.Generator().manual_seed(setup.seed + 2)
    return torch.randint(0, setup.vocab_size, (setup.batch, setup.seq_len), generator=gen)


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Eval-mode (dropout off) loss and adapter gradients, for the equivalence check."""
    model.eval()
    for p in model.parameters():
        p.grad = None
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable(model).items()}
    for p in model.parameters():
        p.grad = None
    return loss.item(), grads


def check_equivalent(
    model_a: torch.nn.Module, model_b: torch.nn.Module, ids: torch.Tensor
) -> dict[str, float]:
    """Print loss and gradient differences between the two wrapped models; abort if the losses differ."""
    loss_a, grads_a = loss_and_grads(model_a, ids)
    loss_b, grads_b = loss_and_grads(model_b, ids)
    loss_diff = abs(loss_a - loss_b)
    grad_diff = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    print(
        f"sanity: loss a={loss_a:.6f} b={loss_b:.6f} max abs diff={loss_diff:.2e}; adapter grad max abs diff={grad_diff:.2e}"
    )
    if loss_diff > LOSS_TOLERANCE:
        sys.exit(f"abort: losses differ by {loss_diff:.2e} > {LOSS_TOLERANCE:g}")
    return {
        "loss_a": loss_a,
        "loss_b": loss_b,
        "loss_max_abs_diff": loss_diff,
        "grad_max_abs_diff": grad_diff,
    }


def floor_step(model: torch.nn.Module, embeds: torch.Tensor, ids: torch.Tensor) -> Callable[[], None]:
    """The floor: frozen forward from grad-requiring input embeddings, then activation-only backward."""

    def step() -> None:
        x = embeds.detach().requires_grad_(True)
        model(inputs_embeds=x, labels=ids).loss.backward()

    return step


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """One LoRA training step: forward, backward and AdamW on the adapter parameters."""
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return step


def eval_forward(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """An eval-mode, no-grad forward."""

    def step() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    return step


def time_call(fn: Callable[[], object]) -> float:
    """Milliseconds taken by one call of `fn`, with garbage collected beforehand."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(steps: dict[str, Callable[[], None]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Warm every step up, then time `reps` rounds, rotating which side goes first each round."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_call(steps[name]))
    return samples


def interleaved_merge(
    builders: dict[str, Callable[[], torch.nn.Module]], reps: int, warmup: int
) -> dict[str, list[float]]:
    """Time `merge_and_unload()` on a freshly built model per call, building outside the timed region."""
    names = list(builders)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            model = builders[name]()
            ms = time_call(model.merge_and_unload)
            if rep >= warmup:
                samples[name].append(ms)
            del model
    return samples


def saved_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages saved for backward by `forward()`, not counting the model's own parameters
    and buffers (those stay alive anyway)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def ratios(num: list[float], den: list[float]) -> float:
    """Median of the paired per-repetition ratios num[i] / den[i]."""
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


def summarize(samples: dict[str, list[float]], base: str | None, a: str, b: str) -> dict[str, float | None]:
    """Median ms per side and medians of paired ratios for one timed measurement."""
    out: dict[str, float | None] = {f"{k}_ms": statistics.median(v) for k, v in samples.items()}
    out["a_over_base"] = ratios(samples[a], samples[base]) if base else None
    out["b_over_base"] = ratios(samples[b], samples[base]) if base else None
    out["a_over_b"] = ratios(samples[a], samples[b])
    return out


def fmt(x: float | None, digits: int = 1) -> str:
    """A table cell: a number with `digits` decimals, or an em dash for None."""
    return "—" if x is None else f"{x:.{digits}f}"


def table_row(label: str, r: dict, base: str | None, unit: str) -> str:
    """One markdown row: baseline, side a, side b in `unit`, then the three ratios."""
    values = [r[f"{base}_{unit}"] if base else None, r[f"a_{unit}"], r[f"b_{unit}"]]
    ratios_ = [r["a_over_base"], r["b_over_base"], r["a_over_b"]]
    return "| " + " | ".join([label, *map(fmt, values), *(fmt(x, 3) for x in ratios_)]) + " |"


def table(results: dict, a: str, b: str) -> str:
    """The markdown results table."""
    return "\n".join(
        [
            f"| measurement | baseline | {a} | {b} | {a}/baseline | {b}/baseline | {a}/{b} |",
            "|---|---:|---:|---:|---:|---:|---:|",
            table_row("train step (ms)", results["train_step"], "floor", "ms"),
            table_row("saved for backward (MiB)", results["saved_for_backward"], "floor", "mib"),
            table_row("eval forward, unmerged (ms)", results["eval_forward"], "bare", "ms"),
            table_row("merge_and_unload (ms)", results["merge"], None, "ms"),
        ]
    )


def measure_memory(
    floor: torch.nn.Module,
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    embeds: torch.Tensor,
    ids: torch.Tensor,
) -> dict[str, float]:
    """Saved-for-backward MiB of one training forward of each side, and their ratios."""
    mib = {
        "floor": saved_bytes(
            floor, lambda: floor(inputs_embeds=embeds.detach().requires_grad_(True), labels=ids).loss
        ),
        "a": saved_bytes(model_a, lambda: model_a(input_ids=ids, labels=ids).loss),
        "b": saved_bytes(model_b, lambda: model_b(input_ids=ids, labels=ids).loss),
    }
    mib = {k: v / MIB for k, v in mib.items()}
    return {
        **{f"{k}_mib": v for k, v in mib.items()},
        "a_over_base": mib["a"] / mib["floor"],
        "b_over_base": mib["b"] / mib["floor"],
        "a_over_b": mib["a"] / mib["b"],
    }


def adapted_builder(
    lib: ModuleType, base: torch.nn.Module, setup: Setup, adapter: dict
) -> Callable[[], torch.nn.Module]:
    """A function building a fresh wrapped copy of `base` carrying `adapter`."""

    def build() -> torch.nn.Module:
        model = wrap(lib, base, setup)
        load_adapter(model, adapter)
        return model

    return build


def run(args: argparse.Namespace) -> dict:
    """Run every measurement and return the results."""
    torch.set_num_threads(args.threads)
    setup = make_setup(args)
    lib_a, lib_b = importlib.import_module(args.lib_a), importlib.import_module("peft")
    base = build_base(setup)
    ids = make_batch(setup)

    model_a = wrap(lib_a, base, setup)
    adapter = make_adapter(model_a, setup.seed)
    load_adapter(model_a, adapter)
    model_b = adapted_builder(lib_b, base, setup, adapter)()
    sanity = check_equivalent(model_a, model_b, ids)

    floor = copy.deepcopy(base)
    with torch.no_grad():
        embeds = floor.get_input_embeddings()(ids)
    sides = {"floor": floor, "a": model_a, "b": model_b}
    for model in sides.values():
        model.train()

    print("measuring saved-for-backward bytes ...", flush=True)
    memory = measure_memory(floor, model_a, model_b, embeds, ids)

    print(f"timing training steps ({args.reps} reps) ...", flush=True)
    steps = {
        "floor": floor_step(floor, embeds, ids),
        "a": train_step(model_a, ids),
        "b": train_step(model_b, ids),
    }
    train = interleaved(steps, args.reps, args.warmup)

    print(f"timing eval forwards ({args.reps} reps) ...", flush=True)
    for model in sides.values():
        model.eval()
    infer = interleaved(
        {"bare": eval_forward(floor, ids), "a": eval_forward(model_a, ids), "b": eval_forward(model_b, ids)},
        args.reps,
        args.warmup,
    )
    del sides, steps, floor, model_a, model_b

    print(f"timing merge_and_unload ({args.reps} reps) ...", flush=True)
    builders = {
        "a": adapted_builder(lib_a, base, setup, adapter),
        "b": adapted_builder(lib_b, base, setup, adapter),
    }
    merge = interleaved_merge(builders, args.reps, min(args.warmup, 1))

    return {
        "libraries": {"a": args.lib_a, "b": "peft"},
        "setup": asdict(setup),
        "reps": args.reps,
        "warmup": args.warmup,
        "threads": args.threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft": lib_b.__version__,
        },
        "sanity": sanity,
        "train_step": {**summarize(train, "floor", "a", "b"), "samples_ms": train},
        "saved_for_backward": memory,
        "eval_forward": {**summarize(infer, "bare", "a", "b"), "samples_ms": infer},
        "merge": {**summarize(merge, None, "a", "b"), "samples_ms": merge},
    }


def header(results: dict) -> str:
    """A one-paragraph description of what was run, printed above the table."""
    s = results["setup"]
    return (
        f"Llama h={s['hidden_size']} ffn={s['intermediate_size']} layers={s['num_layers']} heads={s['num_heads']} "
        f"vocab={s['vocab_size']}, batch {s['batch']}x{s['seq_len']}, float32, CPU, {results['threads']} threads; "
        f"LoRA r={s['rank']} alpha={s['alpha']} dropout={s['dropout']} on {','.join(TARGETS)}.\n"
        f"{results['reps']} interleaved reps after {results['warmup']} warm-up; ms columns are medians, ratio "
        f"columns medians of per-rep paired ratios. {results['wall_s']:.0f} s total; 1-min load average "
        f"{results['load_start']:.2f} at start, {results['load_end']:.2f} at end; malloc: {results['malloc']}."
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: run, print the table, optionally write JSON."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    malloc = malloc_mode(args.keep_freed_memory)
    load_start, start = os.getloadavg()[0], time.perf_counter()
    results = run(args)
    results.update(wall_s=time.perf_counter() - start, load_start=load_start, load_end=os.getloadavg()[0])
    results.update(malloc=malloc)
    print(f"\n{header(results)}\n")
    print(table(results, args.lib_a if args.lib_a != "peft" else "peft (A)", "peft"))
    write_json(results, args.json)


def write_json(results: dict, path: str | None) -> None:
    """Write `results` to `path` as indented JSON (nothing when `path` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
