"""Trainer callbacks of the `lorakit` command: a progress bar with loss and speed, and `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback


class ProgressBar(TrainerCallback):
    """One tqdm bar over the optimizer steps (rank 0 only), showing the last logged loss and lr.

    tqdm adds the speed (steps/s) and the time left.
    """

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            shown = {"loss": f"{logs['loss']:.4f}"}
            if "learning_rate" in logs:
                shown["lr"] = f"{logs['learning_rate']:.2e}"
            if "rewards/margins" in logs:
                shown["margin"] = f"{logs['rewards/margins']:.3f}"
            self.bar.set_postfix(shown, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLog(TrainerCallback):
    """Appends every log entry as one JSON line (`{"step": ..., "loss": ..., ...}`) to `path` (rank 0).

    On a resumed run, entries past the checkpoint's step (logged by the interrupted run after its
    last checkpoint) are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [entry for entry in read_metrics(self.path) if entry.get("step", 0) <= state.global_step]
        self.path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The entries of a `metrics.jsonl` file (empty when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics: list[dict], path: str | Path, title: str) -> bool:
    """Write the training-loss curve of `metrics` to a PNG; False when matplotlib is missing or no
    entry has a loss."""
    points = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if not points:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
