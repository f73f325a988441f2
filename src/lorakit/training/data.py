"""Training data: rows from JSONL / JSON / CSV files or a `datasets.Dataset`, tokenised per task.

Every example is a dict of token-id lists; the collators pad them on the right:
- classification: `input_ids`, `labels` (an int);
- SFT: `input_ids`, `labels` (a copy of `input_ids` with -100 wherever the loss must not look:
  the prompt, or every chat turn but the assistant's);
- DPO: `prompt_ids`, `chosen_ids`, `rejected_ids`, joined by `DpoCollator` into one batch of
  2 x B sequences (chosen first) whose `labels` mask the prompt.
The `*_examples` functions take rows that `check_columns` has passed.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .recipe import RecipeError, RecipeKeys

IGNORE_INDEX = -100
# Used when neither the tokenizer nor the recipe brings a chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a `.jsonl`, `.json` (a list of objects) or `.csv` file.

    Raises:
        RecipeError: another suffix, or a line/file that does not parse (with its line number).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RecipeError(f"{path}:{number} is not valid JSON: {err.msg}.") from None
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RecipeError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}.") from None
        if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
            rows = next(iter(rows.values()))  # {"data": [...]}
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise RecipeError(f"{path}: data files must be .jsonl, .json or .csv, not {suffix or 'no suffix'!r}.")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise RecipeError(f"{path} must hold a list of objects (one example each).")
    if not rows:
        raise RecipeError(f"{path} holds no examples.")
    return rows


def as_rows(data: Iterable[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Rows of a `datasets.Dataset` (or any iterable of dicts)."""
    rows = [dict(row) for row in data]
    if not rows:
        raise RecipeError(f"{source} holds no examples.")
    return rows


def required_columns(keys: RecipeKeys, rows: list[dict[str, Any]]) -> dict[str, str]:
    """The columns the task reads, by recipe key (`{"text_column": "text", ...}`)."""
    if keys.task == "classification":
        names = ("text_column", "label_column")
    elif keys.task == "dpo":
        names = ("prompt_column", "chosen_column", "rejected_column")
    elif keys.messages_column in rows[0] and keys.prompt_column not in rows[0]:
        names = ("messages_column",)
    else:
        names = ("prompt_column", "completion_column")
    return {name: getattr(keys, name) for name in names}


def check_columns(keys: RecipeKeys, rows: list[dict[str, Any]], source: str) -> None:
    """Check that every row holds a value of the right type in each column the task reads.

    Text columns hold strings, a label column strings or integers, a messages column lists of
    `{"role": ..., "content": ...}` objects. Rows are counted from 0, in file order.

    Raises:
        RecipeError: naming the missing column and the recipe key that names it (with the columns
            that are there), or the first row whose value is missing or of another type (with the
            column and the value's type).
    """
    present = set(rows[0])
    for key, column in required_columns(keys, rows).items():
        missing = [i for i, row in enumerate(rows) if row.get(column) is None]
        if len(missing) == len(rows):
            raise RecipeError(
                f"{source} has no column {column!r}; its columns are {sorted(present)}. "
                f"Set {key}: <column> in the recipe."
            )
        if missing:
            others = len(missing) - 1
            more = {0: "", 1: " (nor does 1 more row)"}.get(others, f" (nor do {others} more rows)")
            raise RecipeError(
                f"{source} row {missing[0]} has no {column!r} value{more}; give it one or drop the row."
            )
        kinds, wanted = _COLUMN_TYPES.get(key, ((str,), "a string"))
        for i, row in enumerate(rows):
            value = row[column]
            if not isinstance(value, kinds) or (key == "messages_column" and not _is_chat(value)):
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                raise RecipeError(
                    f"{source} row {i}: {column!r} ({key}) must be {wanted}, got "
                    f"{type(value).__name__} {shown}."
                )


# what each column must hold (any other column the tasks read: a string)
_COLUMN_TYPES = {
    "label_column": ((str, int), "a string or an integer"),
    "messages_column": ((list,), "a list of {'role': ..., 'content': ...} objects"),
}


def _is_chat(messages: list) -> bool:
    return all(isinstance(m, dict) and "role" in m for m in messages)


def label_names(rows: list[dict[str, Any]], column: str) -> list[str]:
    """Class names in a stable order: sorted strings, or `0..max` when the labels are integers."""
    values = {row[column] for row in rows}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values)


def classification_examples(
    rows: list[dict[str, Any]], tokenizer, keys: RecipeKeys, labels: list[str], source: str
) -> list[dict[str, Any]]:
    """`input_ids` (truncated to `max_length`) and the label's index in `labels`."""
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({str(row[keys.label_column]) for row in rows} - set(index))
    if unknown:
        raise RecipeError(f"{source} has labels {unknown} that the training data lacks (labels: {labels}).")
    encoded = tokenizer([row[keys.text_column] for row in rows], truncation=True, max_length=keys.max_length)
    return [
        {"input_ids": ids, "labels": index[str(row[keys.label_column])]}
        for ids, row in zip(encoded["input_ids"], rows)
    ]


def sft_examples(rows: list[dict[str, Any]], tokenizer, keys: RecipeKeys) -> list[dict[str, Any]]:
    """Prompt/completion pairs or chat `messages`, with the loss on the completion only."""
    if "messages_column" in required_columns(keys, rows):
        return _drop_empty(
            [_chat_example(row[keys.messages_column], tokenizer, keys.max_length) for row in rows]
        )
    examples = []
    for row in rows:
        prompt = _prefix(tokenizer) + _ids(tokenizer, row[keys.prompt_column])
        completion = _ids(tokenizer, row[keys.completion_column]) + [end_of_text_id(tokenizer)]
        input_ids = (prompt + completion)[: keys.max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[: keys.max_length]
        examples.append({"input_ids": input_ids, "labels": labels})
    return _drop_empty(examples)


def dpo_examples(rows: list[dict[str, Any]], tokenizer, keys: RecipeKeys) -> list[dict[str, Any]]:
    """Token ids of prompt, chosen and rejected; the prompt keeps its last `max_prompt_length` tokens
    and each answer is cut so that prompt + answer fits `max_length`."""
    eos = end_of_text_id(tokenizer)
    examples = []
    for row in rows:
        prompt = _prefix(tokenizer) + _ids(tokenizer, row[keys.prompt_column])
        if keys.max_prompt_length is not None:
            prompt = prompt[-keys.max_prompt_length :]
        room = max(keys.max_length - len(prompt), 1)
        examples.append(
            {
                "prompt_ids": prompt,
                "chosen_ids": (_ids(tokenizer, row[keys.chosen_column]) + [eos])[:room],
                "rejected_ids": (_ids(tokenizer, row[keys.rejected_column]) + [eos])[:room],
            }
        )
    return examples


def end_of_text_id(tokenizer) -> int:
    """The id that ends a completion: `eos_token`, else `sep_token` (BERT-style vocabularies)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return token_id
    raise RecipeError("The tokenizer has neither an eos_token nor a sep_token to end completions with.")


class ListDataset(torch.utils.data.Dataset):
    """A map-style dataset over a list of examples."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class PadCollator:
    """Pads `input_ids` (with `pad_id`) and `labels` (with -100 when they are sequences) on the right."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad([f["input_ids"] for f in features], self.pad_id)
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], list):
            return {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "labels": pad(labels, IGNORE_INDEX)[0],
            }
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(labels)}


class DpoCollator:
    """Joins prompt + chosen and prompt + rejected into one batch of 2 x B rows (chosen first).

    `labels` are -100 on the prompt and the padding, so a sequence's log-probability is the sum over
    its answer tokens.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, labels = [], []
        for answer in ("chosen_ids", "rejected_ids"):
            for f in features:
                sequences.append(f["prompt_ids"] + f[answer])
                labels.append([IGNORE_INDEX] * len(f["prompt_ids"]) + f[answer])
        input_ids, attention_mask = pad(sequences, self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": pad(labels, IGNORE_INDEX)[0],
        }


def pad(sequences: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) right-padded tensor of `sequences` and its (B, L) attention mask."""
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return out, mask


# ---- helpers -------------------------------------------------------------------------------------
def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefix(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _drop_empty(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    if not kept:
        raise RecipeError("Every example's completion was cut off by max_length; raise max_length.")
    if len(kept) < len(examples):
        warnings.warn(
            f"{len(examples) - len(kept)} of {len(examples)} examples were dropped: max_length cut off "
            "their whole completion.",
            stacklevel=3,
        )
    return kept


def _chat_example(messages: list[dict[str, str]], tokenizer, max_length: int) -> dict[str, Any]:
    """Tokens of the whole conversation; labels only on the assistant turns (content and end token).

    Each assistant turn spans, in the rendered text, from the end of the prompt that asks for it
    (`add_generation_prompt=True`) to the end of the conversation rendered up to it; tokens whose
    characters fall inside a span are learned.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(upto) or start > len(upto):
            raise RecipeError(
                "The chat template renders a conversation differently from its prefixes, so assistant "
                "turns cannot be located; use a template that appends one message at a time."
            )
        spans.append((start, len(upto)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"][:max_length]
    labels = [
        token if any(s <= begin and end <= e for s, e in spans) and end > begin else IGNORE_INDEX
        for token, (begin, end) in zip(input_ids, encoded["offset_mapping"])
    ]
    return {"input_ids": input_ids, "labels": labels}
