"""`PeftModel`: PEFT's user-facing wrapper, its task classes, files, and `get_peft_model`.

`PeftModel(model)` holds `base_model` (a `LoraModel`) which holds `model` (yours), so parameter
names read `base_model.model.<path>...` exactly as in PEFT.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import os
import types
from collections.abc import Iterator

import torch
from torch import nn

from .config import TASK_HEAD_MODULES, PeftConfig, TaskType, bias_mode
from .files import read_adapter_weights
from .model import LoraModel
from .save_and_load import (
    FSDP1_WRAPPED,
    Slot,
    adapter_slots,
    check_fits,
    copy_into,
    full_tensors,
    save_adapter_files,
)
from .tuners.bottleneck.config import BottleneckConfig
from .tuners.lora.config import LoraConfig
from .tuners.lora.layer import Embedding


class PeftModel(nn.Module):
    """A model with adapters: forward, generate and attributes pass through to your model.

    Args:
        model: the base model (modified in place: target modules are wrapped).
        peft_config: the first adapter's config.
        adapter_name: its name ("default" is saved at the top of a folder, others in subfolders).
    """

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs
    ) -> None:
        super().__init__()
        then = kwargs.pop("_then", None)  # from_pretrained's weight load, inside the injection's undo
        _reject_unsupported_kwargs(kwargs, ("autocast_adapter_dtype", "low_cpu_mem_usage"))
        peft_config = self._with_task_heads(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        self.base_model = LoraModel(model, peft_config, adapter_name, then=then)
        self.forward = types.MethodType(_forward_with_signature_of(model), self)

    # ---- pass-through ----------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Your model's forward; `adapter_names=[...]` (one per sample, `"__base__"` for none) runs
        a mixed batch, in training as in inference."""
        with self.base_model.per_sample_adapters(kwargs.pop("adapter_names", None)):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The base model's `generate`, with the active adapters in the loop.

        `adapter_names` (one per prompt) works as in `forward`; each name is repeated for the
        `num_beams * num_return_sequences` rows generate makes of its prompt.
        """
        names = kwargs.pop("adapter_names", None)
        if names is not None:
            copies = kwargs.get("num_beams", 1) * kwargs.get("num_return_sequences", 1)
            names = [n for n in names for _ in range(copies)]
        with self.base_model.per_sample_adapters(names):
            return self.get_base_model().generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """Your model (with its adapted layers in place)."""
        return self.base_model.model

    # ---- adapters ----------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add another adapter (inactive until `set_adapter`)."""
        self.base_model.inject_adapter(adapter_name, self._with_task_heads(peft_config))

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        progressbar: bool = False,
    ) -> None:
        """Add `adapter_name`, a weighted combination of `adapters` (PEFT's eleven combination types).

        The new adapter is inactive until `set_adapter(adapter_name)`. See
        `lorakit.tuners.lora.weighted.add_weighted_adapter` for each form and where lorakit differs from PEFT.
        """
        self.base_model.add_weighted_adapter(
            adapters,
            weights,
            adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            svd_driver=svd_driver,
            density=density,
            majority_sign_method=majority_sign_method,
            progressbar=progressbar,
        )

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def enable_adapter_layers(self) -> None:
        self.base_model.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        self.base_model.disable_adapter_layers()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model is the base model (e.g. DPO's reference model)."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the adapters into the base weights; returns your model without adapter layers."""
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging; returns your model as it was."""
        return self.base_model.unload()

    # ---- parameter counts ----------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; total includes the adapters."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---- files -------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ) -> None:
        """Write each adapter as PEFT does: "default" in `save_directory`, others in subfolders.

        Args:
            safe_serialization: safetensors (default) or a `.bin` file.
            selected_adapters: adapters to save (default: all).
            save_embedding_layers: also save the full weight of targeted `embed_tokens`/`lm_head`
                layers; "auto" does so when such a layer is a target (PEFT's rule).
            is_main_process: write nothing when False (the other ranks of a distributed run; under
                FSDP2 every rank must still call this, since it gathers the shards).
            path_initial_model_for_weight_conversion: the folder where this adapter was saved right
                after a PiSSA/OLoRA init. The adapter is then written as a plain LoRA of rank 2r
                relative to the *original* base weights, so it loads on the untouched base model.
            state_dict: take the adapter values from this dict, keyed by this model's own
                `state_dict()` names (transformers' Trainer passes the gathered one under FSDP or
                DeepSpeed ZeRO-3); the files hold the same keys as without it. Other entries are ignored.

        Raises:
            ValueError: `state_dict` lacks an adapter tensor (the message names it).
        """
        _reject_unsupported_kwargs(kwargs, ())
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={str(save_directory)!r} is a file; pass a folder.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"selected_adapters {unknown} do not exist; this model has {list(self.peft_config)}."
            )
        for name in names:
            config = self.peft_config[name]
            folder = str(save_directory) if name == "default" else os.path.join(str(save_directory), name)
            embed = self._saves_embeddings(name, save_embedding_layers)
            slots = adapter_slots(self.get_base_model(), name, bias_mode(config), embed)
            if state_dict is None:
                tensors = {key: slot.tensor for key, slot in slots.items()}
            else:
                tensors = self._adapter_values_in(state_dict, slots)
            # gathering FSDP2 shards is a collective: every rank takes part, then only one writes
            tensors = full_tensors(tensors)
            if not is_main_process:
                continue
            if path_initial_model_for_weight_conversion is not None:
                tensors, config = _convert_mutated_init(
                    tensors, config, str(path_initial_model_for_weight_conversion)
                )
            save_adapter_files(folder, tensors, config.to_json_string(), safe=safe_serialization)

    def _adapter_values_in(
        self, state_dict: dict[str, torch.Tensor], slots: dict[str, Slot]
    ) -> dict[str, torch.Tensor]:
        """File key -> the value `state_dict` holds for that slot's tensor.

        A slot is matched to its in-memory names by tensor identity (a tied tensor has several), so
        no file key is ever turned into a module name by string editing; FSDP1's wrapper attribute is
        dropped from the names, as in the state dicts FSDP gathers.
        """
        names: dict[int, list[str]] = {}
        own = itertools.chain(
            self.named_parameters(remove_duplicate=False), self.named_buffers(remove_duplicate=False)
        )
        for name, tensor in own:
            clean = ".".join(part for part in name.split(".") if part != FSDP1_WRAPPED)
            names.setdefault(id(tensor), []).extend(dict.fromkeys([name, clean]))
        values = {}
        for key, slot in slots.items():
            candidates = names.get(id(slot.tensor), [])
            found = next((name for name in candidates if name in state_dict), None)
            if found is None:
                raise ValueError(
                    f"state_dict has no entry for adapter tensor {key} (looked for {candidates or 'no name'}); pass "
                    "the model's full state_dict(), keyed as model.state_dict() names it."
                )
            values[key] = state_dict[found]
        return values

    def _saves_embeddings(self, adapter_name: str, setting: str | bool) -> bool:
        if setting != "auto":
            return bool(setting)
        return any(
            isinstance(m, Embedding) and adapter_name in m.r and n.endswith(("embed_tokens", "lm_head"))
            for n, m in self.get_base_model().named_modules()
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        subfolder: str | None = None,
        **kwargs,
    ) -> PeftModel:
        """Load a saved adapter (lorakit's or PEFT's folder) onto `model`.

        Raises:
            FileNotFoundError / ValueError: missing, corrupted or mismatched files; `model` is then
                left exactly as it was.
        """
        _reject_unsupported_kwargs(kwargs, ("autocast_adapter_dtype", "low_cpu_mem_usage", "torch_device"))
        folder = _local_folder(model_id, subfolder)
        config = config if config is not None else PeftConfig.from_pretrained(folder)
        config.inference_mode = not is_trainable
        state = read_adapter_weights(folder)
        peft_cls = MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type, PeftModel) if cls is PeftModel else cls
        requires_grad = {param: param.requires_grad for param in model.parameters()}
        try:
            peft_model = peft_cls(model, config, adapter_name, _then=_weights_loader(state, folder))
        except Exception:
            for param, flag in requires_grad.items():
                param.requires_grad_(flag)
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        subfolder: str | None = None,
        **kwargs,
    ) -> None:
        """Load a saved adapter as `adapter_name` beside the existing ones (not activated)."""
        _reject_unsupported_kwargs(kwargs, ("autocast_adapter_dtype", "low_cpu_mem_usage", "torch_device"))
        folder = _local_folder(model_id, subfolder)
        config = PeftConfig.from_pretrained(folder)
        config.inference_mode = not is_trainable
        state = read_adapter_weights(folder)
        self.base_model.inject_adapter(
            adapter_name,
            self._with_task_heads(config),
            then=_weights_loader(state, folder),
        )
        if not is_trainable:
            self.eval()

    def _with_task_heads(self, config: PeftConfig) -> PeftConfig:
        heads = TASK_HEAD_MODULES.get(getattr(self, "task_type", None) or "", ())
        if heads and isinstance(config, (LoraConfig, BottleneckConfig)):
            present = config.modules_to_save or []
            config.modules_to_save = present + [h for h in heads if h not in present]
        return config


def _weights_loader(state: dict[str, torch.Tensor], source: str):
    """`LoraModel.inject_adapter`'s `then` for a load: check that `state` fits the new adapter, copy it in."""

    def load(lora_model: LoraModel, adapter_name: str) -> None:
        config = lora_model.peft_config[adapter_name]
        slots = adapter_slots(lora_model.model, adapter_name, bias_mode(config), save_embedding_layers=True)
        check_fits(slots, state, source)
        copy_into(slots, state)

    return load


class PeftModelForCausalLM(PeftModel):
    """PeftModel for `task_type="CAUSAL_LM"`."""

    task_type = TaskType.CAUSAL_LM.value


class PeftModelForSeq2SeqLM(PeftModel):
    """PeftModel for `task_type="SEQ_2_SEQ_LM"`."""

    task_type = TaskType.SEQ_2_SEQ_LM.value


class PeftModelForSequenceClassification(PeftModel):
    """PeftModel for `task_type="SEQ_CLS"`: the `classifier`/`score` head trains in full."""

    task_type = TaskType.SEQ_CLS.value


class PeftModelForTokenClassification(PeftModel):
    """PeftModel for `task_type="TOKEN_CLS"`: the `classifier`/`score` head trains in full."""

    task_type = TaskType.TOKEN_CLS.value


class PeftModelForQuestionAnswering(PeftModel):
    """PeftModel for `task_type="QUESTION_ANS"`: the `qa_outputs` head trains in full."""

    task_type = TaskType.QUESTION_ANS.value


class PeftModelForFeatureExtraction(PeftModel):
    """PeftModel for `task_type="FEATURE_EXTRACTION"`."""

    task_type = TaskType.FEATURE_EXTRACTION.value


MODEL_TYPE_TO_PEFT_MODEL: dict[str | None, type[PeftModel]] = {
    cls.task_type: cls
    for cls in (
        PeftModelForCausalLM,
        PeftModelForSeq2SeqLM,
        PeftModelForSequenceClassification,
        PeftModelForTokenClassification,
        PeftModelForQuestionAnswering,
        PeftModelForFeatureExtraction,
    )
}


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs
) -> PeftModel:
    """Wrap `model` with a new adapter; the class follows `peft_config.task_type` (PEFT's rule).

    Example:
        >>> config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        >>> model = get_peft_model(model, config)
    """
    _reject_unsupported_kwargs(kwargs, ("autocast_adapter_dtype", "low_cpu_mem_usage", "mixed"))
    if isinstance(model, PeftModel):
        raise ValueError(
            "This model already has adapters; use model.add_adapter(name, config) to add another."
        )
    peft_cls = MODEL_TYPE_TO_PEFT_MODEL.get(peft_config.task_type, PeftModel)
    return peft_cls(model, peft_config, adapter_name)


def _convert_mutated_init(
    tensors: dict[str, torch.Tensor], config: LoraConfig, initial_folder: str
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """Re-express an adapter trained on a residual base (PiSSA/OLoRA) against the original base.

    With W_res = W - s B0 A0, the model computes W_res + s B1 A1 = W + s [B1, -B0] [A1; A0]: a plain
    LoRA of rank 2r. The alphas change so every module keeps its scaling (see
    `init.converted_rank_and_alpha`).
    """
    from . import init as lora_init

    if not isinstance(config, LoraConfig):
        raise ValueError(
            "path_initial_model_for_weight_conversion applies to PiSSA/OLoRA LoRA adapters only; "
            f"this adapter is {config.peft_type}."
        )
    if config.use_dora:
        raise NotImplementedError("Weight conversion of DoRA adapters is not implemented; save without it.")
    if config.init_lora_weights == "loftq":
        raise ValueError(
            "path_initial_model_for_weight_conversion does not apply to LoftQ: its base is a quantized weight, "
            "not an exact residual, so no plain LoRA reproduces the trained model on the original base."
        )
    initial = read_adapter_weights(initial_folder)
    # saved embedding base weights are the residuals; the converted adapter sits on the original base
    converted = {k: v for k, v in tensors.items() if not k.endswith(".base_layer.weight")}
    for key, value in tensors.items():
        if key.endswith(("lora_A.weight", "lora_embedding_A")):
            b_key = key.replace("lora_A.weight", "lora_B.weight").replace(
                "lora_embedding_A", "lora_embedding_B"
            )
            missing = [k for k in (key, b_key) if k not in initial or initial[k].shape != tensors[k].shape]
            if missing:
                raise ValueError(
                    f"The initial adapter in {initial_folder!r} does not fit this one ({missing[0]} missing or of "
                    "another shape); pass the folder saved right after this adapter was created."
                )
            a0, b0 = initial[key].to(value), initial[b_key].to(tensors[b_key])
            converted[key] = torch.cat([value.detach(), a0], dim=0)
            converted[b_key] = torch.cat([tensors[b_key].detach(), -b0], dim=1)
    new = copy.deepcopy(config)
    new.r, new.lora_alpha = lora_init.converted_rank_and_alpha(config.r, config.lora_alpha, config.use_rslora)
    new.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    new.alpha_pattern = {
        k: lora_init.converted_rank_and_alpha(1, v, config.use_rslora)[1]
        for k, v in config.alpha_pattern.items()
    }
    new.init_lora_weights = True
    return converted, new


def _local_folder(model_id: str | os.PathLike, subfolder: str | None) -> str:
    folder = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Adapter folder {folder!r} does not exist. lorakit loads local folders written by save_pretrained "
            "(lorakit's or PEFT's); fetch hub adapters first, e.g. huggingface_hub.snapshot_download(repo_id)."
        )
    return folder


def _reject_unsupported_kwargs(kwargs: dict, accepted_defaults: tuple[str, ...]) -> None:
    """PEFT keyword arguments lorakit takes but ignores must be at harmless values; others raise."""
    harmless = {
        "autocast_adapter_dtype": True,
        "low_cpu_mem_usage": False,
        "mixed": False,
        "torch_device": None,
    }
    for key, value in kwargs.items():
        if key in accepted_defaults and (harmless.get(key) == value or key == "torch_device"):
            continue
        raise TypeError(f"Argument {key}={value!r} is not supported by lorakit here.")


def _forward_with_signature_of(model: nn.Module):
    """`PeftModel.forward` carrying the base model's signature.

    transformers' Trainer drops dataset columns the model's forward does not name, and inspects
    PEFT's own class specially to find them; exposing the base signature makes the plain Trainer
    keep `input_ids`, `labels`, ... for lorakit models too. A bound method (not a closure) so that
    deepcopy rebinds it to the copy.
    """

    def forward(self, *args, **kwargs):
        return PeftModel.forward(self, *args, **kwargs)

    try:
        base = inspect.signature(model.forward)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        forward.__signature__ = base.replace(parameters=[self_param, *base.parameters.values()])
    except (TypeError, ValueError):
        pass
    forward.__doc__ = PeftModel.forward.__doc__
    return forward


def get_peft_model_state_dict(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` would write for `adapter_name`, under PEFT's file keys.

    FSDP2-sharded (DTensor) parameters come back whole, so every rank must call this.
    """
    config = model.peft_config[adapter_name]
    embed = model._saves_embeddings(adapter_name, "auto")
    slots = adapter_slots(model.get_base_model(), adapter_name, bias_mode(config), embed)
    return full_tensors({key: slot.tensor.detach() for key, slot in slots.items()})


def set_peft_model_state_dict(
    model: PeftModel, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """Load file-keyed tensors into adapter `adapter_name`; checks every key and shape first."""
    _weights_loader(peft_model_state_dict, "the given state dict")(model.base_model, adapter_name)
