"""LoRA+: parameter groups and learning rates, and the Trainer's adapter-only checkpoints and resume."""

import os

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import TrainerCallback

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.optimizers import create_loraplus_optimizer
from lorakit.training import LoraPlusTrainer, LoraPlusTrainingArguments
from tests.helpers import tiny_llama


def lr_and_decay_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_groups_give_b_dora_and_biases_the_ratio_and_embeddings_their_own_lr():
    net = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    model = get_peft_model(
        net,
        LoraConfig(r=4, target_modules=["0", "1"], use_dora=True, bias="lora_only", modules_to_save=["2"]),
    )
    optimizer = create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=1e-3,
        loraplus_lr_ratio=8,
        loraplus_lr_embedding=1e-5,
        loraplus_weight_decay=0.1,
    )
    groups = lr_and_decay_by_name(model, optimizer)
    assert set(groups) == {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        "base_model.model.0.lora_embedding_A.default": (1e-5, 0.1),
        "base_model.model.0.lora_embedding_B.default": (1e-5, 0.1),
        "base_model.model.0.lora_magnitude_vector.default.weight": (8e-3, 0.1),
        "base_model.model.1.lora_A.default.weight": (1e-3, 0.1),
        "base_model.model.1.lora_B.default.weight": (8e-3, 0.1),
        "base_model.model.1.lora_magnitude_vector.default.weight": (8e-3, 0.1),
        "base_model.model.1.base_layer.bias": (8e-3, 0.0),  # biases: ratio, no decay
        "base_model.model.2.modules_to_save.default.weight": (8e-3, 0.0),  # norms: ratio, no decay
        "base_model.model.2.modules_to_save.default.bias": (8e-3, 0.0),
    }
    assert groups == pytest.approx(expected)


def test_conv_dora_magnitude_is_in_the_b_group_despite_its_4d_shape():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"], use_dora=True))
    groups = lr_and_decay_by_name(model, create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1))
    assert groups["base_model.model.0.lora_magnitude_vector.default.weight"][0] == pytest.approx(1.6)


def test_same_learning_rates_as_peft():
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer as peft_create

    config = {"r": 4, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}
    ours = get_peft_model(tiny_llama(), LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    kwargs = {"lr": 2e-4, "loraplus_lr_ratio": 16, "loraplus_lr_embedding": 1e-6}
    ours_lr = lr_and_decay_by_name(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs))
    theirs_lr = lr_and_decay_by_name(theirs, peft_create(theirs, torch.optim.AdamW, **kwargs))
    assert {n: lr for n, (lr, _) in ours_lr.items()} == {n: lr for n, (lr, _) in theirs_lr.items()}


def test_weight_decay_kwarg_is_redirected_with_a_clear_error():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="loraplus_weight_decay"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)


class Tokens(Dataset):
    def __init__(self, n=16):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, 12), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer(output_dir, max_steps=4, **kwargs):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = LoraPlusTrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_steps=2,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        seed=0,
        data_seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        loraplus_lr_ratio=4,
        **kwargs,
    )
    return LoraPlusTrainer(model=model, args=args, train_dataset=Tokens())


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_trainer_uses_loraplus_rates_and_writes_adapter_only_checkpoints(tmp_path):
    run = trainer(tmp_path)
    run.train()
    rates = {g["initial_lr"] if "initial_lr" in g else g["lr"] for g in run.optimizer.param_groups}
    assert rates == {1e-3, 4e-3}
    checkpoint = tmp_path / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not any(f.startswith(("model", "pytorch_model")) for f in files)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-4")
    for name, value in adapter_state(reloaded).items():
        torch.testing.assert_close(value, adapter_state(run.model)[name])


def test_resume_from_checkpoint_ends_with_the_same_adapter(tmp_path):
    straight = trainer(tmp_path / "straight")
    straight.train()
    first_half = trainer(tmp_path / "resumed")
    first_half.add_callback(StopAfter(2))  # interrupted mid-run: same schedule, stops after checkpoint-2
    first_half.train()
    assert first_half.state.global_step == 2
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    expected = adapter_state(straight.model)
    for name, value in adapter_state(resumed.model).items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5, msg=name)
