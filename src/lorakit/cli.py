"""The `lorakit` command.

    lorakit train [RECIPE] [--resume] [--key value ...]   fine-tune (no RECIPE: the quickstart)
    lorakit merge ADAPTER --out DIR [--safe-merge]         merged full model, transformers format
    lorakit info ADAPTER                                   config, targets, parameter counts, base
    lorakit recipes                                        the shipped recipes

Errors in what the user gave (recipe, files, adapter folders) print one message and exit with 2, and
so do failed reads and writes (a full disk, a read-only folder): one line with what failed, the path,
the system's reason and a hint, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lorakit` console script; returns the exit status."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from safetensors import SafetensorError

    from .training.recipe import RecipeError

    destination = None  # where the command writes, named when a write fails without naming a file
    try:
        if args.command == "train":
            from transformers.utils import logging as hf_logging

            from .training.recipe import load_recipe, parse_overrides
            from .training.run import train

            # the command prints its own summary; transformers' load reports and bars would bury it
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()

            name = rest.pop(0) if rest and not rest[0].startswith("-") else None
            recipe = load_recipe(name, parse_overrides(rest))
            destination = recipe.training["output_dir"]
            train(recipe, resume=args.resume)
        elif args.command == "merge":
            destination = args.out
            out = merge(args.adapter, args.out, safe_merge=args.safe_merge)
            print(f"lorakit: merged model written to {out}")
        elif args.command == "info":
            print(info(args.adapter))
        else:
            from .training.recipe import shipped_recipes

            for name, path in sorted(shipped_recipes().items()):
                print(f"{name:12s} {path}")
    except (OSError, SafetensorError) as err:
        print(f"lorakit: error: {_io_failure(args.command, err, destination)}", file=sys.stderr)
        return 2
    except (RecipeError, NotImplementedError, ValueError) as err:
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 2
    return 0


# what to do about a failed write, by errno; the flag names where the command writes
_IO_HINTS = {
    errno.ENOSPC: "free some space there, or point {flag} at another disk",
    errno.EDQUOT: "free some of your quota there, or point {flag} at another disk",
    errno.EFBIG: "raise the file-size limit (ulimit -f), or point {flag} at another disk",
    errno.EACCES: "make it writable for you, or point {flag} elsewhere",
    errno.EPERM: "make it writable for you, or point {flag} elsewhere",
    errno.EROFS: "the file system is read-only; point {flag} elsewhere",
}


def _io_failure(command: str, err: Exception, destination: str | None) -> str:
    """One line for a failed read or write: the command, the path, the system's reason, a hint.

    `err` is an OSError or a safetensors `SafetensorError`, whose text carries the errno
    (`... I/O error: No space left on device (os error 28)`) but no path; `destination` (the
    command's output folder) stands in for a path the error does not name.
    """
    code = getattr(err, "errno", None)
    if code is None:
        found = re.search(r"\(os error (\d+)\)", str(err))
        code = int(found.group(1)) if found else None
    if code is None:  # lorakit's own FileNotFoundError / FileExistsError: already a full message
        return str(err)
    path = getattr(err, "filename", None) or destination or "?"
    flag = "--out" if command == "merge" else "--output_dir"
    hint = _IO_HINTS.get(code, "check that path").format(flag=flag)
    return f"{command} failed on {path}: {os.strerror(code)} (errno {code}); {hint}."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning from YAML recipes.")
    commands = parser.add_subparsers(dest="command")
    train = commands.add_parser(
        "train",
        help="fine-tune from a recipe",
        usage="lorakit train [RECIPE] [--resume] [--key value ...]",
        description="Fine-tune from RECIPE (a YAML file or a shipped recipe's name; default: the "
        "quickstart). Any recipe key can be overridden with --key value.",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
    )
    merge_cmd = commands.add_parser("merge", help="merge an adapter into its base model")
    merge_cmd.add_argument("adapter", help="adapter folder (adapter_config.json + weights)")
    merge_cmd.add_argument("--out", required=True, help="folder for the merged model (must not exist)")
    merge_cmd.add_argument("--safe-merge", action="store_true", help="check merged weights for NaN/inf first")
    info_cmd = commands.add_parser("info", help="describe a saved adapter")
    info_cmd.add_argument("adapter", help="adapter folder")
    commands.add_parser("recipes", help="list the shipped recipes")
    return parser


def merge(adapter: str | os.PathLike, out: str | os.PathLike, safe_merge: bool = False) -> Path:
    """Load `adapter` onto its base model, merge it, and save the plain model (+ tokenizer) to `out`.

    The base model is rebuilt exactly as `lorakit train` built it when the adapter folder holds its
    recipe (`lorakit_recipe.yaml`); otherwise it is `base_model_name_or_path` of the adapter config,
    loaded with the task's auto class (a classifier's label count read from the saved head).
    The model is written to a temporary folder first and renamed to `out` at the end.

    Raises:
        FileExistsError: `out` exists. FileNotFoundError / ValueError: bad adapter folder or base.
    """
    from .files import save_folder_atomically
    from .peft_model import PeftModel

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; give --out a new folder (nothing was written).")
    base, tokenizer = _base_for(Path(adapter))
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload(safe_merge=safe_merge)
    save_folder_atomically(out, merged, tokenizer)
    return out


def _base_for(adapter: Path):
    from .config import PeftConfig
    from .training.run import BASE_MODEL_FOLDER, RECIPE_FILE

    config = PeftConfig.from_pretrained(adapter)
    if (adapter / RECIPE_FILE).is_file():
        import yaml

        from .training.recipe import load_recipe
        from .training.run import build_model, load_tokenizer

        saved = yaml.safe_load((adapter / RECIPE_FILE).read_text())
        labels = saved.pop("labels", None)
        recipe = load_recipe({**saved, "output_dir": str(adapter)})
        tokenizer = load_tokenizer(recipe)
        if recipe.keys.model_config is not None:  # the base that training saved beside the adapter
            base_path = config.base_model_name_or_path or str(adapter / BASE_MODEL_FOLDER)
            recipe.keys.model_config, recipe.keys.model_name_or_path = None, base_path
        return build_model(recipe, tokenizer, labels), tokenizer
    return _base_from_config(adapter, config)


def _base_from_config(adapter: Path, config):
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from .config import TASK_HEAD_MODULES
    from .files import read_adapter_weights

    base_path = config.base_model_name_or_path
    if not base_path:
        raise ValueError(f"{adapter}/adapter_config.json names no base_model_name_or_path; cannot merge.")
    task = config.task_type or ""
    kwargs = {}
    if task == "SEQ_CLS":
        state = read_adapter_weights(str(adapter))
        heads = [k for k in state for h in TASK_HEAD_MODULES["SEQ_CLS"] if k.endswith(f".{h}.weight")]
        if heads:
            kwargs["num_labels"] = state[heads[0]].shape[0]
    auto = {"SEQ_CLS": AutoModelForSequenceClassification, "CAUSAL_LM": AutoModelForCausalLM}.get(
        task, AutoModel
    )
    try:
        base = auto.from_pretrained(base_path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"Cannot load the base model {base_path!r} named by the adapter: {err}"
        ) from None
    source = adapter if (adapter / "tokenizer_config.json").is_file() else base_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = None
    return base, tokenizer


def info(adapter: str | os.PathLike) -> str:
    """A readable description of a saved adapter folder, from its files alone (no model is loaded)."""
    from .config import PeftConfig
    from .files import read_adapter_weights

    folder = Path(adapter)
    config = PeftConfig.from_pretrained(folder)
    state = read_adapter_weights(str(folder))
    data = config.to_dict()
    lines = [f"adapter: {folder}", f"  type: {data.get('peft_type')}  task: {data.get('task_type')}"]
    if data.get("peft_type") == "LORA":
        rule = "lora_alpha/sqrt(r)" if data.get("use_rslora") else "lora_alpha/r"
        variant = ", DoRA" if data.get("use_dora") else ""
        lines.append(
            f"  r={data['r']}  lora_alpha={data['lora_alpha']}  scaling={rule}{variant}  "
            f"dropout={data['lora_dropout']}  init={data['init_lora_weights']}"
        )
    elif data.get("peft_type") == "BOTTLENECK":
        size = (
            f"bottleneck_size={data['bottleneck_size']}"
            if data.get("bottleneck_size")
            else f"reduction_factor={data['reduction_factor']}"
        )
        lines.append(
            f"  mode={data['mode']}  {size}  non_linearity={data['non_linearity']}  "
            f"scaling={data['scaling']}  layer_norm={data['layer_norm']}"
        )
    targets = sorted({_module_of(key) for key in state if _kind_of(key) != "modules_to_save"})
    lines.append(f"  target_modules (config): {json.dumps(data.get('target_modules'))}")
    lines.append(
        f"  adapted modules: {len(targets)}"
        + (f" ({', '.join(targets[:4])}{', ...' if len(targets) > 4 else ''})" if targets else "")
    )
    if data.get("modules_to_save"):
        lines.append(f"  modules_to_save: {', '.join(data['modules_to_save'])}")
    counts = Counter()
    for key, tensor in state.items():
        counts[_kind_of(key)] += tensor.numel()
    total = sum(counts.values())
    lines.append(
        f"  parameters: {total:,}  (" + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())) + ")"
    )
    base = data.get("base_model_name_or_path")
    base_params = _checkpoint_parameters(base) if base else None
    lines.append(
        f"  base model: {base or 'unknown'}"
        + (
            f" ({base_params:,} parameters; adapter = {100 * total / base_params:.2f}%)"
            if base_params
            else ""
        )
    )
    subfolders = sorted(p.name for p in folder.iterdir() if (p / "adapter_config.json").is_file())
    checkpoints = [name for name in subfolders if name.startswith("checkpoint-")]
    others = [name for name in subfolders if name not in checkpoints]
    if others:
        lines.append(f"  more adapters in subfolders: {', '.join(others)}")
    if checkpoints:
        lines.append(f"  training checkpoints: {', '.join(checkpoints)}")
    return "\n".join(lines)


def _kind_of(key: str) -> str:
    from .names import LORA_PARAMETERS

    for kind in LORA_PARAMETERS:
        if f".{kind}" in key:
            return kind
    if ".modules_to_save." in key or not any(s in key for s in ("lora_", "adapter_")):
        return "modules_to_save"
    return key.rsplit(".", 2)[-2]


def _module_of(key: str) -> str:
    parts = key.removeprefix("base_model.model.").split(".")
    for i, part in enumerate(parts):
        if part.startswith(("lora_", "adapter_")):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def _checkpoint_parameters(base: str) -> int | None:
    """Parameter count of a local model folder, read from its safetensors headers only."""
    folder = Path(base)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                total += _numel(handle.get_slice(key).get_shape())
    return total


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


if __name__ == "__main__":
    sys.exit(main())
