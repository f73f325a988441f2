"""LoRA+ vs plain LoRA: optimizer steps to reach the same training loss on the quickstart task.

Runs the shipped quickstart recipe (all-MiniLM-L6-v2, six intents, lr 2e-4 for A) with
`loraplus_lr_ratio` 16 and with plain LoRA (ratio 1, every group at lr), for several seeds, logging
the training loss at every step. For each target loss it reports the first step at which the loss,
averaged over a sliding window, falls to the target, per seed and as the median ratio
steps(LoRA) / steps(LoRA+). The LoRA+ paper (Hayou et al., 2024) reports up to ~2x faster
fine-tuning. Counts steps, not seconds, so it is safe to run on a busy machine::

    python benchmarks/bench_loraplus.py --seeds 0 1 2 --json runs/bench_loraplus.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from lorakit.training.callbacks import read_metrics
from lorakit.training.run import train

TARGETS = (1.0, 0.5, 0.25)


def loss_curve(ratio: float | None, seed: int, steps: int, out: Path) -> list[float]:
    """Per-step training losses of the quickstart with LoRA+ `ratio` (None: plain LoRA)."""
    train(
        None,
        overrides={
            "output_dir": str(out),
            "seed": seed,
            "max_steps": steps,
            "logging_steps": 1,
            "save_strategy": "no",
            "eval_file": None,
            "disable_tqdm": True,
            "loraplus_lr_ratio": ratio,
        },
    )
    return [m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]


def steps_to(losses: list[float], target: float, window: int) -> int | None:
    """First step (1-based) whose trailing `window`-step mean loss is <= target; None if never."""
    for end in range(window, len(losses) + 1):
        if sum(losses[end - window : end]) / window <= target:
            return end
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120, help="steps per run (the quickstart's 4 epochs)")
    parser.add_argument("--window", type=int, default=5, help="moving-average window of the loss")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    runs = {"lora+ (ratio 16)": 16.0, "lora": None}
    results: dict[str, dict[int, list[float]]] = {name: {} for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, ratio in runs.items():  # interleaved per seed
                results[name][seed] = loss_curve(ratio, seed, args.steps, Path(tmp) / f"{name}-{seed}")

    table = []
    for target in TARGETS:
        plus = [steps_to(results["lora+ (ratio 16)"][s], target, args.window) for s in args.seeds]
        plain = [steps_to(results["lora"][s], target, args.window) for s in args.seeds]
        ratios = [b / a for a, b in zip(plus, plain) if a and b]
        table.append(
            {
                "target_loss": target,
                "steps_lora_plus": plus,
                "steps_lora": plain,
                "median_speedup": statistics.median(ratios) if ratios else None,
            }
        )
    print(
        f"steps to reach a {args.window}-step mean training loss (seeds {args.seeds}, {args.steps} steps max)"
    )
    print(f"{'target':>8} {'LoRA+ (16)':>16} {'LoRA':>16} {'LoRA / LoRA+':>14}")
    for row in table:
        speedup = f"{row['median_speedup']:.2f}x" if row["median_speedup"] else "n/a"
        print(
            f"{row['target_loss']:>8} {row['steps_lora_plus']!s:>16} {row['steps_lora']!s:>16} {speedup:>14}"
        )
    final = {name: statistics.median(curves[s][-1] for s in args.seeds) for name, curves in results.items()}
    print("median final loss: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"table": table, "final_loss": final, "curves": results}, indent=2))


if __name__ == "__main__":
    main()
