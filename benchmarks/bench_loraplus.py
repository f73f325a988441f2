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
QUICKSTART_LR = 2e-4  # the quickstart recipe's learning_rate
# name: (loraplus_lr_ratio, learning-rate factor). Plain LoRA also runs at 4x and 16x the rate, so
# LoRA+ is compared with a tuned LoRA, not only with LoRA at LoRA+'s rate for A.
RUNS = {
    "LoRA+ (16)": (16.0, 1.0),
    "LoRA": (None, 1.0),
    "LoRA lr x4": (None, 4.0),
    "LoRA lr x16": (None, 16.0),
}


def loss_curve(ratio: float | None, lr_factor: float, seed: int, steps: int, out: Path) -> list[float]:
    """Per-step training losses of the quickstart with LoRA+ `ratio` (None: plain LoRA) and the
    recipe's learning rate times `lr_factor`."""
    train(
        None,
        overrides={
            "learning_rate": QUICKSTART_LR * lr_factor,
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


def _steps(values: list[int | None], limit: int) -> str:
    return ",".join(str(v) if v else f">{limit}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120, help="steps per run (the quickstart's 4 epochs)")
    parser.add_argument("--window", type=int, default=5, help="moving-average window of the loss")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    results: dict[str, dict[int, list[float]]] = {name: {} for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, (ratio, factor) in RUNS.items():  # interleaved per seed
                out = Path(tmp) / f"{name.replace(' ', '_')}-{seed}"
                results[name][seed] = loss_curve(ratio, factor, seed, args.steps, out)

    table = []
    for target in TARGETS:
        row = {"target_loss": target}
        for name in RUNS:
            row[name] = [steps_to(results[name][s], target, args.window) for s in args.seeds]
        plus = row["LoRA+ (16)"]
        for name in list(RUNS)[1:]:
            ratios = [(b or args.steps + 1) / a for a, b in zip(plus, row[name]) if a]
            row[f"speedup vs {name}"] = statistics.median(ratios) if ratios else None
        table.append(row)
    print(
        f"steps to a {args.window}-step mean training loss; seeds {args.seeds}; '>{args.steps}': not reached (counted as "
        f"{args.steps + 1}, so the speedup is then a lower bound)"
    )
    print(
        f"{'target':>7} "
        + " ".join(f"{name:>16}" for name in RUNS)
        + "   LoRA steps / LoRA+ steps (best LoRA)"
    )
    for row in table:
        cells = " ".join(f"{_steps(row[name], args.steps):>16}" for name in RUNS)
        best = min((row[f"speedup vs {n}"] for n in list(RUNS)[1:] if row[f"speedup vs {n}"]), default=None)
        print(
            f"{row['target_loss']:>7} {cells}   {best:.2f}x" if best else f"{row['target_loss']:>7} {cells}"
        )
    final = {name: statistics.median(curves[s][-1] for s in args.seeds) for name, curves in results.items()}
    print("median final loss: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"table": table, "final_loss": final, "curves": results}, indent=2))


if __name__ == "__main__":
    main()
