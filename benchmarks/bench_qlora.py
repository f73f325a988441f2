"""QLoRA benchmark: lorakit against PEFT on the same bitsandbytes 4-bit (nf4) Llama, on CPU.

Saves a random Llama built from a config, loads it twice with `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=float32)`, runs `prepare_model_for_kbit_training`
(each library's own, without gradient checkpointing) and `get_peft_model` with LoRA r=16 on every
decoder linear, gives both the same adapter weights, checks they compute the same loss, then measures:

1. training-step time (forward + backward + AdamW on the adapters), interleaved A B A B, median of
   paired per-repetition ratios (bench_core's harness);
2. bytes of tensors saved for backward by one training forward (saved_tensors_hooks);
3. the process's peak RSS (one process holds both models, so it is not split by side).

Usage: python benchmarks/bench_qlora.py [--reps N] [--warmup N] [--threads T] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import warnings

import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_core as core  # noqa: E402

MIB = 2**20
# bnb's CPU 4-bit kernels need in_features a multiple of the 64-value block and out a multiple of 32
FULL_SHAPE = dict(
    hidden_size=256, intermediate_size=704, num_layers=2, num_heads=4, vocab_size=4000, batch=2, seq_len=128
)
QUICK_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=256, batch=2, seq_len=16
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per side (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 reps: a smoke run")
    p.add_argument("--json", metavar="PATH", help="also write all numbers, raw samples included, to PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 2, 1
    return args


def load_4bit(path: str) -> LlamaForCausalLM:
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def wrap(lib, path: str, setup: core.Setup) -> torch.nn.Module:
    """`lib`'s QLoRA model: 4-bit base, prepare_model_for_kbit_training, LoRA on every decoder linear."""
    model = lib.prepare_model_for_kbit_training(load_4bit(path), use_gradient_checkpointing=False)
    config = lib.LoraConfig(
        r=setup.rank, lora_alpha=setup.alpha, target_modules=core.TARGETS, task_type="CAUSAL_LM"
    )
    return lib.get_peft_model(model, config)


def run(args: argparse.Namespace) -> dict:
    import peft

    import lorakit

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    setup = core.Setup(**shape, rank=16, alpha=32, dropout=0.0, seed=args.seed)
    torch.manual_seed(setup.seed)
    base_config = LlamaConfig(
        hidden_size=setup.hidden_size,
        intermediate_size=setup.intermediate_size,
        num_hidden_layers=setup.num_layers,
        num_attention_heads=setup.num_heads,
        num_key_value_heads=setup.num_heads,
        vocab_size=setup.vocab_size,
    )
    with tempfile.TemporaryDirectory() as path:
        LlamaForCausalLM(base_config).save_pretrained(path)
        models = {"lorakit": wrap(lorakit, path, setup), "peft": wrap(peft, path, setup)}
    adapter = core.make_adapter(models["lorakit"], setup.seed)
    for model in models.values():
        core.load_adapter(model, adapter)
    ids = core.make_batch(setup)
    sanity = core.check_equivalent(models["lorakit"], models["peft"], ids)
    for model in models.values():
        model.train()
    steps = {name: core.train_step(model, ids) for name, model in models.items()}
    samples = core.interleaved(steps, args.reps, args.warmup)
    saved = {
        name: core.saved_bytes(model, lambda m=model: m(input_ids=ids, labels=ids).loss) / MIB
        for name, model in models.items()
    }
    return {
        "setup": shape,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "sanity": sanity,
        "step": core.summarize(samples, None, "lorakit", "peft"),
        "saved_mib": saved,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    step, saved = results["step"], results["saved_mib"]
    print(f"QLoRA (bnb nf4, CPU) {results['setup']}, {results['reps']} reps, {results['threads']} threads")
    print("| measurement | lorakit | PEFT | lorakit / PEFT (paired) |")
    print("|---|---:|---:|---:|")
    print(
        f"| training step (ms) | {step['lorakit_ms']:.1f} | {step['peft_ms']:.1f} | {step['a_over_b']:.3f} |"
    )
    ratio = saved["lorakit"] / saved["peft"]
    print(f"| saved for backward (MiB) | {saved['lorakit']:.1f} | {saved['peft']:.1f} | {ratio:.3f} |")
    print(f"process peak RSS: {results['peak_rss_mib']:.0f} MiB (both models)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
