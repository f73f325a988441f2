"""Adapter folders on disk: the file names, atomic writes and crash-safe commits, and reads.

Imports nothing from lorakit: `config.py` and `checkpoint.py` (which tensor goes under which key)
both build on it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
# the weights files a folder may hold, in the order a loader prefers them
WEIGHTS_NAMES = (SAFETENSORS_NAME, BIN_NAME)


def pending_name(name: str) -> str:
    """The hidden name a save gives `name` before it replaces the live file."""
    return f".{name}.pending"


def finish_interrupted_save(directory: str) -> None:
    """Complete a save of `save_adapter_files` that stopped after its commit point, or drop the
    uncommitted weights of one that stopped before it; remove the temporary files of saves killed
    while writing. Afterwards only live files are left (never run it beside a save in progress)."""
    for name in os.listdir(directory):
        if name.endswith(".tmp") and name.startswith(tuple(f".{n}." for n in (CONFIG_NAME, *WEIGHTS_NAMES))):
            os.remove(os.path.join(directory, name))
    pending_config = os.path.join(directory, pending_name(CONFIG_NAME))
    pending = [n for n in WEIGHTS_NAMES if os.path.exists(os.path.join(directory, pending_name(n)))]
    if not os.path.exists(pending_config):
        for name in pending:
            os.remove(os.path.join(directory, pending_name(name)))
        return
    for name in pending[:1]:
        for other in WEIGHTS_NAMES:
            # a live file of the other format would shadow or contradict the new weights
            if other != name and os.path.exists(os.path.join(directory, other)):
                os.remove(os.path.join(directory, other))
        os.replace(os.path.join(directory, pending_name(name)), os.path.join(directory, name))
        _fsync_dir(directory)
    os.replace(pending_config, os.path.join(directory, CONFIG_NAME))
    _fsync_dir(directory)


def committed_files(directory: str) -> tuple[str, str | None]:
    """(config path, weights path or None) of the adapter that `directory` holds.

    Normally the live `adapter_config.json` and weights file (safetensors before `.bin`). After a
    save stopped past its commit point (see `save_adapter_files`), the pending config and the
    pending weights, or the live weights once those were renamed. Reads only; changes nothing.
    """
    pending_config = os.path.join(directory, pending_name(CONFIG_NAME))
    committed = os.path.exists(pending_config)
    config = pending_config if committed else os.path.join(directory, CONFIG_NAME)
    candidates = [pending_name(n) for n in WEIGHTS_NAMES if committed] + list(WEIGHTS_NAMES)
    weights = next(
        (os.path.join(directory, n) for n in candidates if os.path.isfile(os.path.join(directory, n))),
        None,
    )
    return config, weights


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    tmp = _temp_path(os.path.dirname(path) or ".", os.path.basename(path))
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_folder_atomically(folder: str | os.PathLike, *savables) -> None:
    """`save_pretrained` each of `savables` (None skipped) into a staging folder beside `folder`, then
    rename it to `folder` (which must not exist, or be empty): readers see all of it or nothing."""
    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}-", dir=parent)
    try:
        for item in savables:
            if item is not None:
                item.save_pretrained(staging)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    """Read the adapter weights in `directory` (safetensors, or a `.bin` loaded with weights_only);
    after an interrupted save, those of the committed pair (`committed_files`).

    Raises:
        FileNotFoundError: no weights file.
        ValueError: the file is unreadable (corrupted or truncated).
    """
    path = committed_files(directory)[1]
    if path is None:
        raise FileNotFoundError(
            f"No {SAFETENSORS_NAME} or {BIN_NAME} in {directory!r}: this folder holds no adapter weights."
        )
    if SAFETENSORS_NAME in os.path.basename(path):
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{path} is not a readable safetensors file ({err}); it is corrupted or was not fully "
                "written. Save the adapter again or restore it from a good copy."
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad or unsafe pickles
        raise ValueError(
            f"{path} could not be loaded with weights_only=True ({type(err).__name__}: {err}); lorakit "
            "never unpickles arbitrary objects. Re-save the adapter with safe_serialization=True."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors; it is not an adapter file.")
    return state


def _temp_path(directory: str, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return path


def _fsync(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(directory: str) -> None:
    """Make the renames in `directory` durable in order (a power cut keeps the commit order)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder: there the renames are not fsynced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
