"""Feature benchmark: lorakit against PEFT on dropout, DoRA, mixed-adapter batches and PiSSA init.

Same model, adapters and interleaved paired-ratio timing as `bench_core.py` (see README.md), on CPU
float32 by default or, with `--device cuda --dtype bfloat16 --shape gpu`, on a bigger Llama on a GPU.
Sections (`--only` picks some):

- `core`: training step against the floor, saved-for-backward MiB, unmerged eval forward against
  the bare model (bench_core's rows; here also on GPU);
- `dropout`: the step with lora_dropout=0.1 against the dropout-0 step, per library, and lorakit's
  with `kernels.share_dropout_masks(True)` (one mask per input; off by default); saved MiB;
- `dora`: the DoRA step against the LoRA step, per library; saved MiB of each;
- `mixed`: an eval forward of a batch of 8 whose samples use 4 adapters (2 each, interleaved)
  against the same batch on one adapter, per library; lorakit's mixed training step too;
- `init`: `get_peft_model` with `init_lora_weights="pissa"` and `"pissa_niter_4"`, lorakit / PEFT.

Usage: python benchmarks/bench_features.py [--only dropout,dora] [--reps N] [--threads T]
       [--device cuda --dtype bfloat16 --shape gpu] [--keep-freed-memory] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import peft
import torch
from bench_core import (
    FULL_SHAPE,
    MIB,
    QUICK_SHAPE,
    TARGETS,
    Setup,
    build_base,
    eval_forward,
    floor_step,
    interleaved,
    make_batch,
    malloc_mode,
    ratios,
    saved_bytes,
    train_step,
    trainable,
    write_json,
)

import lorakit
from lorakit import kernels

LIBS = {"lk": lorakit, "pf": peft}
SECTIONS = ("core", "dropout", "dora", "mixed", "init")
GPU_SHAPE = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=4,
    num_heads=32,
    vocab_size=32000,
    batch=4,
    seq_len=1024,
)
SHAPES = {"full": FULL_SHAPE, "quick": QUICK_SHAPE, "gpu": GPU_SHAPE}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only", default=",".join(SECTIONS), help=f"sections, comma-separated (default all: {SECTIONS})"
    )
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 25; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shape", default="full", choices=list(SHAPES))
    p.add_argument("--quick", action="store_true", help="tiny model, 2 reps: a smoke run")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="have glibc keep freed memory, so no side pays page faults at random (bench_core.keep_freed_memory)",
    )
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.shape = "quick"
    args.reps = args.reps if args.reps is not None else (2 if args.quick else 25)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.dtype = getattr(torch, args.dtype)
    return args


def wrap(lib, base: torch.nn.Module, setup: Setup, names=("default",), **config) -> torch.nn.Module:
    """`base` deep-copied and wrapped by `lib`, one LoRA adapter per name, every adapter trainable
    and filled with the same seeded values in both libraries (B nonzero; DoRA magnitudes kept)."""
    cfg = dict(r=setup.rank, lora_alpha=setup.alpha, target_modules=TARGETS, lora_dropout=setup.dropout)
    cfg.update(config)
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**cfg), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lib.LoraConfig(**cfg))
    model.base_model.set_adapter(list(names))
    gen = torch.Generator().manual_seed(setup.seed + 1)
    with torch.no_grad():
        for name, p in sorted(trainable(model).items()):
            if "lora_A" in name or "lora_B" in name:
                std = 0.02 if "lora_B" in name else 1.0 / p.shape[-1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    if len(names) == 1:
        model.set_adapter(names[0])
    return model


def synced(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn` followed by a device synchronisation, so wall-clock timing sees the GPU work."""
    if not torch.cuda.is_available():
        return fn

    def step() -> None:
        fn()
        torch.cuda.synchronize()

    return step


def timed(steps: dict[str, Callable[[], None]], args) -> dict[str, list[float]]:
    return interleaved({k: synced(v) for k, v in steps.items()}, args.reps, args.warmup)


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {f"{k}_ms": statistics.median(v) for k, v in samples.items()}


def mib(model, forward) -> float:
    return saved_bytes(model, forward) / MIB


def loss_of(model, ids) -> Callable[[], torch.Tensor]:
    return lambda: model(input_ids=ids, labels=ids).loss


def core(base, setup, ids, args) -> dict:
    models = {k: wrap(lib, base, setup).train() for k, lib in LIBS.items()}
    floor = copy.deepcopy(base).train()
    embeds = floor.get_input_embeddings()(ids).detach()
    memory = {
        "floor": mib(floor, lambda: floor(inputs_embeds=embeds.requires_grad_(True), labels=ids).loss),
        **{k: mib(m, loss_of(m, ids)) for k, m in models.items()},
    }
    train = timed(
        {"floor": floor_step(floor, embeds, ids), **{k: train_step(m, ids) for k, m in models.items()}}, args
    )
    for m in (floor, *models.values()):
        m.eval()
    infer = timed(
        {"bare": eval_forward(floor, ids), **{k: eval_forward(m, ids) for k, m in models.items()}}, args
    )
    return {
        "train": {**medians(train), **paired(train, [("lk", "floor"), ("pf", "floor"), ("lk", "pf")])},
        "saved_mib": memory,
        "eval": {**medians(infer), **paired(infer, [("lk", "bare"), ("pf", "bare"), ("lk", "pf")])},
    }


def paired(samples: dict[str, list[float]], pairs: list[tuple[str, str]]) -> dict[str, float]:
    return {f"{a}/{b}": ratios(samples[a], samples[b]) for a, b in pairs}


def variant_pair(base, setup, ids, args, plain: dict, variant: dict, shared_masks: bool = False) -> dict:
    """Train steps and saved MiB of a variant against the plain LoRA step, for both libraries;
    with `shared_masks`, also lorakit's variant under `kernels.share_dropout_masks` (side `lks`)."""
    models = {}
    for key, lib in LIBS.items():
        models[f"{key}0"] = wrap(lib, base, setup, **plain).train()
        models[f"{key}1"] = wrap(lib, base, setup, **variant).train()
    memory = {k: mib(m, loss_of(m, ids)) for k, m in models.items()}
    steps = {k: train_step(m, ids) for k, m in models.items()}
    pairs = [("lk1", "lk0"), ("pf1", "pf0"), ("lk1", "pf1"), ("lk0", "pf0")]
    if shared_masks:
        models["lks"] = wrap(lorakit, base, setup, **variant).train()
        steps["lks"] = with_shared_masks(train_step(models["lks"], ids))
        memory["lks"] = mib(models["lks"], with_shared_masks(loss_of(models["lks"], ids)))
        pairs += [("lks", "lk0"), ("lks", "pf1")]
    train = timed(steps, args)
    return {"train": {**medians(train), **paired(train, pairs)}, "saved_mib": memory}


def with_shared_masks(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` run with lorakit's one-mask-per-input dropout option on."""

    def call() -> object:
        kernels.share_dropout_masks(True)
        try:
            return fn()
        finally:
            kernels.share_dropout_masks(False)

    return call


def mixed(base, setup, args) -> dict:
    batch = Setup(**{**setup.__dict__, "batch": 8})
    ids = make_batch(batch).to(args.device)
    names = [f"a{i}" for i in range(4)]
    per_sample = [names[i % 4] for i in range(8)]
    steps = {}
    for key, lib in LIBS.items():
        steps[f"{key}_one"] = eval_forward(wrap(lib, base, setup).eval(), ids)
        steps[f"{key}_mixed"] = mixed_forward(wrap(lib, base, setup, names=names).eval(), ids, per_sample)
    infer = timed(steps, args)
    one, several = wrap(lorakit, base, setup).train(), wrap(lorakit, base, setup, names=names).train()
    train = timed({"one": train_step(one, ids), "mixed": mixed_train_step(several, ids, per_sample)}, args)
    return {
        "eval": {
            **medians(infer),
            **paired(infer, [("lk_mixed", "lk_one"), ("pf_mixed", "pf_one"), ("lk_mixed", "pf_mixed")]),
        },
        "train_lk": {**medians(train), **paired(train, [("mixed", "one")])},
    }


def mixed_forward(model, ids, names) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(input_ids=ids, adapter_names=names)

    return step


def mixed_train_step(model, ids, names) -> Callable[[], None]:
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
        opt.step()

    return step


def init(base, setup, args) -> dict:
    out = {}
    reps = max(3, args.reps // 5)
    for method in ("pissa", "pissa_niter_4"):
        samples: dict[str, list[float]] = {"lk": [], "pf": []}
        for rep in range(reps + 1):
            order = list(LIBS.items()) if rep % 2 == 0 else list(LIBS.items())[::-1]
            for key, lib in order:
                model = copy.deepcopy(base)
                config = lib.LoraConfig(
                    r=setup.rank, lora_alpha=setup.alpha, target_modules=TARGETS, init_lora_weights=method
                )
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    lib.get_peft_model(model, config)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if rep > 0:
                    samples[key].append((time.perf_counter() - start) * 1e3)
        out[method] = {**medians(samples), **paired(samples, [("lk", "pf")])}
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    setup = Setup(**SHAPES[args.shape], rank=16, alpha=32, dropout=0.0, seed=0)
    base = build_base(setup, args.device, args.dtype)
    ids = make_batch(setup).to(args.device)
    wanted = args.only.split(",")
    results: dict = {
        "setup": setup.__dict__,
        "device": args.device,
        "dtype": str(args.dtype),
        "threads": args.threads,
    }
    results["versions"] = {"torch": torch.__version__, "peft": peft.__version__}
    if torch.cuda.is_available() and args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    for section in wanted:
        print(f"{section} ...", flush=True)
        if section == "core":
            results[section] = core(base, setup, ids, args)
        elif section == "dropout":
            results[section] = variant_pair(
                base, setup, ids, args, {}, {"lora_dropout": 0.1}, shared_masks=True
            )
        elif section == "dora":
            results[section] = variant_pair(base, setup, ids, args, {}, {"use_dora": True})
        elif section == "mixed":
            results[section] = mixed(base, setup, args)
        elif section == "init":
            results[section] = init(base, setup, args)
        else:
            sys.exit(f"unknown section {section!r}; choose from {SECTIONS}")
        print(json.dumps(results[section], indent=1), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    malloc = malloc_mode(args.keep_freed_memory)
    load_start, start = os.getloadavg()[0], time.perf_counter()
    results = run(args)
    results.update(wall_s=time.perf_counter() - start, load_start=load_start, load_end=os.getloadavg()[0])
    results.update(reps=args.reps, warmup=args.warmup, malloc=malloc)
    write_json(results, args.json)


if __name__ == "__main__":
    main()
