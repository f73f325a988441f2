"""transformers' `Trainer` and TRL's `SFTTrainer` / `DPOTrainer` for lorakit models.

transformers, accelerate and TRL recognise an adapter model by `isinstance(model, peft.PeftModel)`.
A lorakit `PeftModel` is no such instance, so the stock trainers treat it as a full model: their
checkpoints hold the whole state dict (and fail on tied embeddings), resume loads it strictly,
`evaluate()` finds no label names, a quantized base is refused, `SFTTrainer(peft_config=
lorakit.LoraConfig(...))` raises TypeError, TRL's fused LM head looks for the backbone at
`model.base_model` (lorakit's `LoraModel`, not the backbone) and `DPOTrainer(ref_model=None)` loads a
second full model as the reference. The classes here redo those branches for lorakit models; any
other model trains exactly as with the stock class.

- `Trainer`: `transformers.Trainer` with adapter-only checkpoints (also the base of `LoraPlusTrainer`).
- `SFTTrainer`, `DPOTrainer`: TRL's classes on top of `Trainer`. They are built on first access
  (`lorakit.integrations.SFTTrainer`), so lorakit imports without trl.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import transformers
from torch import nn
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint
from transformers.utils import can_return_loss, find_labels

try:  # transformers >= 5
    from transformers.trainer import rotate_checkpoints
except ImportError:  # pragma: no cover - older transformers rotate inside _save_checkpoint only
    rotate_checkpoints = None

from .config import PeftConfig
from .files import read_adapter_weights
from .peft_model import PeftModel, get_peft_model, set_peft_model_state_dict
from .tuners.base import AdapterLayer, ModulesToSaveWrapper

# Where a checkpoint is written before it is renamed to `checkpoint-N` (inside the run folder).
STAGING_FOLDER = ".checkpoint-in-progress"

# SFTTrainer and DPOTrainer are left out: a star import would import trl
__all__ = ["STAGING_FOLDER", "Trainer"]


class Trainer(transformers.Trainer):
    """`transformers.Trainer` that saves, resumes and evaluates a lorakit `PeftModel` as it does PEFT's.

    - `save_model()` and every `checkpoint-N` hold the adapters in PEFT's format (`adapter_config.json`
      and `adapter_model.safetensors`; adapters other than "default" in subfolders), never base
      weights; checkpoints add the trainer state, optimizer, scheduler and RNG state as usual. A
      checkpoint is written in `STAGING_FOLDER` and renamed into place, so a crash never leaves a
      half-written `checkpoint-N` for a resume to pick up.
    - `train(resume_from_checkpoint=...)` and `load_best_model_at_end` load those adapter files.
    - Label names come from the base model's class (`["labels"]` for a causal LM), so `evaluate()`
      reports `eval_loss` and `compute_metrics` receives the labels.
    - A quantized base (bitsandbytes 4-/8-bit) is accepted: the adapters are what trains.

    Arguments are `transformers.Trainer`'s.
    """

    def __init__(self, model=None, *args, **kwargs) -> None:
        with _adapters_visible_to_transformers(model):
            super().__init__(model, *args, **kwargs)
        adapted = self._adapted_model()
        if adapted is not None and self.args.label_names is None:
            # Trainer reads label names off the model class; ours wraps, so ask the base model's class
            base_class = type(adapted.get_base_model())
            self.label_names = find_labels(base_class)
            self.can_return_loss = can_return_loss(base_class)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`transformers.Trainer.train`; a resume from a checkpoint that already reached `max_steps`
        loads it and trains no further step (transformers would train one more when the checkpoint
        falls inside an epoch, so the adapter would differ from the uninterrupted run's)."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        state_file = os.path.join(folder, "trainer_state.json") if isinstance(folder, str) else None
        if self.args.max_steps <= 0 or state_file is None or not os.path.isfile(state_file):
            return super().train(resume_from_checkpoint, *args, **kwargs)
        state = TrainerState.load_from_json(state_file)
        if state.global_step < self.args.max_steps:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        self._load_from_checkpoint(folder)
        self.state = state
        losses = [entry["train_loss"] for entry in state.log_history if "train_loss" in entry]
        return TrainOutput(state.global_step, losses[-1] if losses else float("nan"), {})

    def _adapted_model(self) -> PeftModel | None:
        """The lorakit model being trained (unwrapped from DDP & co.), or None for any other model."""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        return model if isinstance(model, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        model = self._adapted_model()
        if model is None:
            super()._save(output_dir, state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        # under FSDP / ZeRO-3 the Trainer passes the gathered state dict; the adapter keys come from it
        model.save_pretrained(
            output_dir, safe_serialization=True, state_dict=state_dict, is_main_process=self.args.should_save
        )
        if self.processing_class is not None and self.args.should_save:
            self.processing_class.save_pretrained(output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """Write `checkpoint-N` in a staging folder, then rename it into place.

        A crash mid-save leaves only the staging folder (which the next save clears), never a
        half-written `checkpoint-N` that a resume would pick up.
        """
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, STAGING_FOLDER)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging
        try:
            written = os.path.join(self._get_output_dir(trial=trial), name)
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            final = os.path.join(self._get_output_dir(trial=trial), name)
            if os.path.isdir(final):  # the same step saved by an earlier, interrupted run
                shutil.rmtree(final)
            os.replace(written, final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best is not None and best.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, staging))
            if rotate_checkpoints is not None:
                rotate_checkpoints(
                    output_dir=os.path.dirname(final),
                    save_total_limit=self.args.save_total_limit,
                    best_model_checkpoint=self.state.best_model_checkpoint,
                    use_mtime=False,
                )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        model = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        if not isinstance(model, PeftModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        for name in model.peft_config:
            folder = (
                resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            )
            if os.path.isdir(folder):
                set_peft_model_state_dict(model, read_adapter_weights(folder), adapter_name=name)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and isinstance(self.model, PeftModel):
            self._load_from_checkpoint(best)
        else:
            super()._load_best_model()


@contextlib.contextmanager
def _adapters_visible_to_transformers(model):
    """transformers refuses to train a quantized model unless it sees PEFT adapters, which it reads
    off `model._hf_peft_config_loaded`; a lorakit model has adapters, so say so while Trainer checks."""
    if not isinstance(model, PeftModel):
        yield
        return
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        del model._hf_peft_config_loaded


# ---- TRL ---------------------------------------------------------------------------------------
def _wrap_for_trl(model, peft_config, args, quantization_config):
    """Apply a lorakit `peft_config` as TRL applies a PEFT one; returns TRL's remaining arguments.

    Returns:
        (model, peft_config, quantization_config) to pass on: with a lorakit config, the model wrapped by
        `lorakit.get_peft_model` (loaded first when given as a name, seeded with `args.seed` as TRL
        seeds before creating adapters), None and None. Any other config is TRL's, passed unchanged.
    """
    if not isinstance(peft_config, PeftConfig):
        return model, peft_config, quantization_config
    if isinstance(model, PeftModel):
        raise ValueError(
            f"The model already has lorakit adapters {list(model.peft_config)}, and peft_config asks for another; "
            "pass either the wrapped model or the base model with peft_config."
        )
    if isinstance(model, str):
        from trl.trainer.utils import create_model_from_path

        init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
        if quantization_config is not None:
            init_kwargs["quantization_config"] = quantization_config
        model, quantization_config = create_model_from_path(model, **init_kwargs), None
    transformers.set_seed(transformers.TrainingArguments.seed if args is None else args.seed)
    return get_peft_model(model, peft_config), None, quantization_config


def _reject_adapted_lm_head(model) -> None:
    if not isinstance(model, PeftModel):
        return
    head = model.get_base_model().get_output_embeddings()
    if isinstance(head, (AdapterLayer, ModulesToSaveWrapper)):
        raise ValueError(
            "TRL computes log-probabilities from `lm_head.weight` directly, so an adapter or a trained copy on "
            "`lm_head` would never train; remove 'lm_head' from target_modules and modules_to_save."
        )


def _fused_lm_head_on_base(model, lorakit_forward, outputs: tuple[str, ...]) -> None:
    """Move TRL's fused LM head from the lorakit wrapper to the base model.

    TRL patches `forward` of what it takes for a plain model, the wrapper, and its fused path then
    calls `model.base_model` as the backbone, which is lorakit's `LoraModel`. Patched on the base
    model instead (as TRL does for a PEFT model), the backbone is the base model's own and the
    wrapper's forward, with its adapter options, stays in front.
    """
    from trl.trainer.utils import add_fused_lm_head

    if not isinstance(model, PeftModel):
        return
    model.forward = lorakit_forward
    add_fused_lm_head(model.get_base_model(), outputs=outputs)


def _sft_trainer_class() -> type:
    import trl

    class SFTTrainer(trl.SFTTrainer, Trainer):
        """TRL's `SFTTrainer` for lorakit models, with `Trainer`'s adapter-only checkpoints.

        Args:
            model: a model (or its name), or a lorakit `PeftModel` (then no `peft_config`).
            peft_config: a `lorakit.LoraConfig` (or other lorakit config): the model is wrapped with
                `lorakit.get_peft_model` after `set_seed(args.seed)`, as TRL does with a PEFT config.
                A `peft.PeftConfig` goes to TRL unchanged.
        Other arguments are TRL's. The loss is TRL's default (its fused LM head: per-token
        log-probabilities without building the full logits), computed through the adapters.
        Raises:
            ValueError: a `PeftModel` together with `peft_config`, or an adapter on `lm_head`.
        """

        def __init__(self, model, args=None, *rest, peft_config=None, quantization_config=None, **kwargs):
            model, peft_config, quantization_config = _wrap_for_trl(
                model, peft_config, args, quantization_config
            )
            _reject_adapted_lm_head(model)
            forward = model.forward if isinstance(model, PeftModel) else None
            super().__init__(
                model, args, *rest, peft_config=peft_config, quantization_config=quantization_config, **kwargs
            )
            # the per-token fields SFTTrainer.__init__ asks of its fused head (trl 1.16)
            _fused_lm_head_on_base(model, forward, outputs=("log_probs", "entropy", "is_top1"))

    SFTTrainer.__qualname__ = "SFTTrainer"
    return SFTTrainer


def _dpo_trainer_class() -> type:
    import trl

    class DPOTrainer(trl.DPOTrainer, Trainer):
        """TRL's `DPOTrainer` for lorakit models, with `Trainer`'s adapter-only checkpoints.

        Args:
            model: a model (or its name), or a lorakit `PeftModel` (then no `peft_config`).
            ref_model: default None: for a lorakit model the reference is the same model under
                `disable_adapter()`, i.e. the base model; no second copy is loaded and
                `trainer.ref_model` stays None, as TRL does for PEFT models. (With a PEFT model that
                already has a trained adapter TRL references a frozen copy of it instead; here the
                reference is always the base model.)
            peft_config: a lorakit config, applied as by `SFTTrainer`; a `peft.PeftConfig` goes to TRL.
        Other arguments are TRL's.
        Raises:
            ValueError: a `PeftModel` with `peft_config`, an adapter on `lm_head`, or
                `sync_ref_model=True` without a `ref_model` (there is no reference model to sync).
        """

        def __init__(
            self,
            model,
            ref_model=None,
            args=None,
            *rest,
            peft_config=None,
            quantization_config=None,
            **kwargs,
        ):
            model, peft_config, quantization_config = _wrap_for_trl(
                model, peft_config, args, quantization_config
            )
            _reject_adapted_lm_head(model)
            self._base_reference = None
            if isinstance(model, PeftModel) and ref_model is None:
                if getattr(args, "sync_ref_model", False):
                    raise ValueError(
                        "sync_ref_model=True needs a reference model to update, but with a lorakit model and "
                        "ref_model=None the reference is the base model (adapters disabled); set sync_ref_model=False."
                    )
                self._base_reference = ref_model = _BaseModelReference(model)
            forward = model.forward if isinstance(model, PeftModel) else None
            super().__init__(
                model,
                ref_model,
                args,
                *rest,
                peft_config=peft_config,
                quantization_config=quantization_config,
                **kwargs,
            )
            if self._base_reference is not None:
                self.ref_model = None  # TRL held the stand-in while setting up (and precomputing) references
            # the per-token fields DPOTrainer.__init__ asks of its fused head (trl 1.16)
            outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
            _fused_lm_head_on_base(
                model, forward, outputs + (("log_sum_sq_probs",) if self.use_weighting else ())
            )

        @contextlib.contextmanager
        def _reference_in_place(self):
            """TRL calls `self.ref_model` unless the model is a PEFT model: hand it the base-model stand-in."""
            if self._base_reference is None:
                yield
                return
            self.ref_model = self._base_reference
            try:
                yield
            finally:
                self.ref_model = None

        def compute_ref_log_probs(self, model, inputs):
            """TRL's, with the policy asked for reference log-probs answering with its adapters disabled."""
            if self._base_reference is not None and model is self.model:
                model = self._base_reference
            return super().compute_ref_log_probs(model, inputs)

        def _compute_loss(self, model, inputs, return_outputs):
            with self._reference_in_place():
                return super()._compute_loss(model, inputs, return_outputs)

        def evaluate(self, *args, **kwargs):
            with self._reference_in_place():  # a new eval dataset may need its reference log-probs computed
                return super().evaluate(*args, **kwargs)

    DPOTrainer.__qualname__ = "DPOTrainer"
    return DPOTrainer


class _BaseModelReference(nn.Module):
    """The DPO reference as TRL calls it: the policy with its adapters disabled, without weights of its own.

    The policy is held outside the module tree, so nothing is copied, moved, wrapped or given to
    the optimizer twice; `state_dict()` is the policy's, so TRL's cache key for precomputed reference
    log-probabilities still depends on the model.
    """

    def __init__(self, policy: PeftModel) -> None:
        super().__init__()
        self.__dict__["policy"] = policy
        self.config = policy.config

    def __call__(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.policy.state_dict(*args, **kwargs)


_TRL_TRAINERS = {"SFTTrainer": _sft_trainer_class, "DPOTrainer": _dpo_trainer_class}


def __getattr__(name: str):
    if name in _TRL_TRAINERS:
        cls = _TRL_TRAINERS[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
