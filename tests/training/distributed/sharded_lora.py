"""Train a tiny LoRA Llama sharded (FSDP2, FSDP1 with and without `use_orig_params`) and save it.

Run under `torchrun --nproc_per_node 2 sharded_lora.py RESULT_JSON SAVE_ROOT` (gloo, CPU). Every
mode trains the same seeded model on the same global batch, each rank on its half, and writes
the per-step global loss; rank 0 saves a full-shape adapter to `SAVE_ROOT/<mode>`. The reference
(one process, the whole batch) is `train_single`, imported by `tests/training/test_fsdp.py`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.tuners.lora.layer import LoraLayer

STEPS = 3
GLOBAL_BATCH = 4
SEQ_LEN = 8
VOCAB = 128


def build_base() -> LlamaForCausalLM:
    """The seeded tiny Llama (identical on every rank and in the test)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(config)


def build_model() -> PeftModel:
    """`build_base` with LoRA on attention and MLP projections."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return get_peft_model(build_base(), config)


def batch() -> torch.Tensor:
    """The global batch of token ids, (GLOBAL_BATCH, SEQ_LEN)."""
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def train(model: nn.Module, ids: torch.Tensor, global_loss: Callable[[torch.Tensor], float]) -> list[float]:
    """`STEPS` AdamW steps of causal-LM loss on `ids`; the loss of each step as `global_loss` sees it."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(global_loss(loss.detach()))
    return losses


def train_single() -> tuple[PeftModel, list[float]]:
    """The reference: one process, the whole batch."""
    model = build_model()
    return model, train(model, batch(), lambda loss: loss.item())


def _mean_over_ranks(loss: torch.Tensor) -> float:
    # every rank's half has the same number of tokens, so the mean of the halves' means is the
    # whole batch's mean; FSDP averages the gradients the same way
    loss = loss.clone()
    dist.all_reduce(loss)
    return loss.item() / dist.get_world_size()


def _local_batch() -> torch.Tensor:
    rows = GLOBAL_BATCH // dist.get_world_size()
    return batch()[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def run_fsdp2(save_dir: str) -> list[float]:
    """fully_shard per decoder layer, then the root; every rank calls save_pretrained (it gathers)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    losses = train(model, _local_batch(), _mean_over_ranks)
    model.save_pretrained(save_dir, is_main_process=dist.get_rank() == 0)
    return losses


def run_fsdp1(save_dir: str, use_orig_params: bool) -> list[float]:
    """FullyShardedDataParallel with a decoder-layer wrap policy.

    With `use_orig_params=False` a flat parameter must not mix frozen and trainable tensors, so
    each adapted layer and its base layer are units of their own as well: the base layer's unit is
    all frozen, the adapted layer's unit holds only the adapters.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, lambda_auto_wrap_policy

    model = build_model()
    if use_orig_params:
        policy = ModuleWrapPolicy({LlamaDecoderLayer})
    else:
        base_layers = {id(m.base_layer) for m in model.modules() if isinstance(m, LoraLayer)}

        def own_unit(module: nn.Module) -> bool:
            return isinstance(module, (LlamaDecoderLayer, LoraLayer)) or id(module) in base_layers

        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=own_unit)
    sharded = FSDP(
        model, auto_wrap_policy=policy, use_orig_params=use_orig_params, device_id=torch.device("cpu")
    )
    losses = train(sharded, _local_batch(), _mean_over_ranks)
    with FSDP.summon_full_params(sharded, writeback=False, rank0_only=True):
        if dist.get_rank() == 0:
            model.save_pretrained(save_dir)
    return losses


def fsdp1_flat_params_mixed_unit_error() -> str:
    """What FSDP1 says when `use_orig_params=False` meets a decoder layer holding frozen base
    weights and trainable adapters in one unit (the reason for `run_fsdp1`'s finer policy)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({LlamaDecoderLayer})
    try:
        FSDP(build_model(), auto_wrap_policy=policy, use_orig_params=False, device_id=torch.device("cpu"))
    except ValueError as error:
        return str(error)
    return ""


def main(result_path: str, save_root: str) -> None:
    dist.init_process_group("gloo")
    results = {
        "fsdp2": run_fsdp2(os.path.join(save_root, "fsdp2")),
        "fsdp1_orig_params": run_fsdp1(os.path.join(save_root, "fsdp1_orig_params"), True),
        "fsdp1_flat_params": run_fsdp1(os.path.join(save_root, "fsdp1_flat_params"), False),
        "fsdp1_flat_params_mixed_unit_error": fsdp1_flat_params_mixed_unit_error(),
    }
    if dist.get_rank() == 0:
        with open(result_path, "w", encoding="utf-8") as fh:
            json.dump(results, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
