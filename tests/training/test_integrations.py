"""`lorakit.integrations`: transformers' Trainer and TRL's SFTTrainer / DPOTrainer on lorakit models,
and `PeftModel.save_pretrained(state_dict=...)`, which the Trainer uses under FSDP / ZeRO-3."""

import gc
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

from lorakit import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from lorakit.integrations import Trainer
from tests.helpers import randomize_adapters
from tests.quantized_helpers import load_quantized

trl = pytest.importorskip("trl")

WORDS = "the a cat dog sat ran on mat fast slow big small red blue yes no".split()
VOCAB = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
TRAINER_FILES = {"trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
# lora_dropout=0 keeps the runs comparable: a dropout mask is drawn per step, and the resume test
# compares exact tensors
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
FAST = dict(report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1)


def tiny_llama(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def tokenizer() -> PreTrainedTokenizerFast:
    words = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def token_dataset(rows: int = 8, length: int = 10) -> Dataset:
    ids = torch.randint(3, len(VOCAB), (rows, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


TEXTS = ["the cat sat on the mat", "a dog ran fast", "the big red dog sat", "a small blue cat ran"]
PAIRS = {
    "prompt": ["the cat", "a dog", "the big", "a small"],
    "chosen": [" sat on the mat", " ran fast", " red dog", " blue cat"],
    "rejected": [" no", " yes no", " slow", " mat mat"],
}


def adapter_of(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def assert_adapter_file_holds(folder, model: PeftModel) -> None:
    saved = load_file(str(folder / "adapter_model.safetensors"))
    expected = adapter_of(model)
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key


def full_models_alive() -> int:
    gc.collect()
    return sum(isinstance(obj, PreTrainedModel) for obj in gc.get_objects())


# ---- transformers.Trainer ----------------------------------------------------------------------
def test_trainer_checkpoints_of_a_tied_embedding_model_hold_only_peft_format_adapter_files(tmp_path):
    model = get_peft_model(tiny_llama(tied=True), LoraConfig(**LORA))
    args = TrainingArguments(tmp_path, max_steps=2, save_steps=1, per_device_train_batch_size=4, **FAST)
    Trainer(model=model, args=args, train_dataset=token_dataset()).train()

    for step in (1, 2):
        assert {p.name for p in (tmp_path / f"checkpoint-{step}").iterdir()} == ADAPTER_FILES | TRAINER_FILES
    assert_adapter_file_holds(tmp_path / "checkpoint-2", model)
    # the oracle: PEFT itself loads the checkpoint, and computes what the trained model computes
    from peft import PeftModel as PeftOracle

    oracle = PeftOracle.from_pretrained(tiny_llama(tied=True), str(tmp_path / "checkpoint-2")).eval()
    inputs = torch.tensor(token_dataset()["input_ids"][:2])
    torch.testing.assert_close(oracle(input_ids=inputs).logits, model.eval()(input_ids=inputs).logits)


def test_trainer_resumed_from_a_checkpoint_ends_with_the_uninterrupted_runs_adapter(tmp_path):
    def run(output_dir, max_steps, resume=None):
        model = get_peft_model(tiny_llama(), LoraConfig(**LORA))
        args = TrainingArguments(
            output_dir,
            max_steps=max_steps,
            save_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            **FAST,
        )
        Trainer(model=model, args=args, train_dataset=token_dataset()).train(resume_from_checkpoint=resume)
        return adapter_of(model)

    uninterrupted = run(tmp_path / "whole", 4)
    # checkpoint-2 is what a run stopped after step 2 leaves; a fresh model and trainer resume from it
    halfway = load_file(str(tmp_path / "whole" / "checkpoint-2" / "adapter_model.safetensors"))
    resumed = run(tmp_path / "resumed", 4, resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert any(not torch.equal(halfway[k], uninterrupted[k]) for k in uninterrupted)  # steps 3-4 did train
    # the same losses step by step; the weights agree to float rounding (measured 1.5e-8)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0, msg=key)


def test_trainer_evaluate_reports_the_models_loss_and_compute_metrics_receives_the_labels(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(**LORA))
    randomize_adapters(model)
    data = token_dataset()
    seen = {}

    def compute_metrics(prediction):
        seen["labels"] = prediction.label_ids
        return {"rows": len(prediction.label_ids)}

    args = TrainingArguments(tmp_path, per_device_eval_batch_size=len(data), **FAST)
    trainer = Trainer(model=model, args=args, eval_dataset=data, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()

    assert trainer.label_names == ["labels"]
    inputs = torch.tensor(data["input_ids"])
    with torch.no_grad():
        expected = model.eval()(input_ids=inputs, labels=inputs).loss
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["eval_rows"] == len(data)
    assert (seen["labels"] == inputs.numpy()).all()


def test_trainer_trains_the_adapters_of_a_bitsandbytes_4bit_base_and_leaves_the_base_as_it_was(
    tmp_path, saved_llama
):
    model = get_peft_model(load_quantized(saved_llama, "nf4"), LoraConfig(**LORA))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    packed = q_proj.base_layer.weight.detach().clone()
    before = adapter_of(model)
    ids = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(
        tmp_path, max_steps=2, save_strategy="no", per_device_train_batch_size=2, learning_rate=1e-2, **FAST
    )
    Trainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})
    ).train()

    after = adapter_of(model)
    assert all(math.isfinite(v.abs().sum().item()) for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(q_proj.base_layer.weight, packed)


# ---- save_pretrained(state_dict=...) -------------------------------------------------------------
def test_save_pretrained_takes_the_adapter_values_from_a_given_state_dict_under_the_usual_keys(tmp_path):
    model = get_peft_model(tiny_llama(tied=True), LoraConfig(**LORA))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "plain")
    state = model.state_dict()  # keyed by the model's own names: ...q_proj.lora_A.default.weight
    state.update({name: value + 1.0 for name, value in state.items() if ".lora_" in name})
    model.save_pretrained(tmp_path / "given", state_dict=state)

    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    given = load_file(str(tmp_path / "given" / "adapter_model.safetensors"))
    assert given.keys() == plain.keys()
    for key, value in plain.items():
        assert torch.equal(given[key], value + 1.0), key


def test_save_pretrained_with_a_state_dict_lacking_an_adapter_tensor_names_it(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(**LORA))
    state = {k: v for k, v in model.state_dict().items() if "layers.1.self_attn.v_proj.lora_B" not in k}
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        model.save_pretrained(tmp_path, state_dict=state)
    assert not (tmp_path / "adapter_model.safetensors").exists()


# ---- TRL ---------------------------------------------------------------------------------------
def sft_config(output_dir, **overrides) -> "trl.SFTConfig":
    return trl.SFTConfig(
        output_dir, **{"max_steps": 2, "per_device_train_batch_size": 4, **FAST, **overrides}
    )


def test_sft_trainer_wraps_the_model_for_a_lorakit_config_seeded_as_trl_seeds_peft(tmp_path):
    from lorakit.integrations import SFTTrainer

    args = sft_config(tmp_path, save_steps=1, eval_strategy="no")
    text = Dataset.from_dict({"text": TEXTS * 2})
    trainer = SFTTrainer(
        tiny_llama(), args=args, train_dataset=text, eval_dataset=text, processing_class=tokenizer(),
        peft_config=LoraConfig(**LORA),
    )  # fmt: skip
    assert isinstance(trainer.model, PeftModel)
    base = tiny_llama()
    torch.manual_seed(args.seed)
    expected = adapter_of(get_peft_model(base, LoraConfig(**LORA)))
    initial = adapter_of(trainer.model)
    assert all(torch.equal(initial[k], v) for k, v in expected.items())

    trainer.train()
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    for step in (1, 2):
        names = {p.name for p in (tmp_path / f"checkpoint-{step}").iterdir()}
        assert names == ADAPTER_FILES | TRAINER_FILES | TOKENIZER_FILES
    assert_adapter_file_holds(tmp_path / "checkpoint-2", trainer.model)
    assert (tmp_path / "README.md").exists()  # TRL's model card still lands in the run folder


def test_sft_loss_of_a_wrapped_model_is_the_causal_lm_loss_through_its_adapters(tmp_path):
    from lorakit.integrations import SFTTrainer

    model = get_peft_model(tiny_llama(), LoraConfig(**LORA))
    randomize_adapters(model)  # B != 0: the adapters change the loss
    trainer = SFTTrainer(
        model,
        args=sft_config(tmp_path),
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer(),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, dict(batch))

    def causal_lm_loss():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100)

    with torch.no_grad():
        expected = causal_lm_loss()
        with model.disable_adapter():
            base_only = causal_lm_loss()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, base_only, rtol=1e-3)


def test_sft_trainer_refuses_an_adapter_on_lm_head_and_a_second_config_for_a_wrapped_model(tmp_path):
    from lorakit.integrations import SFTTrainer

    text = Dataset.from_dict({"text": TEXTS})
    head = LoraConfig(**{**LORA, "target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(ValueError, match="lm_head"):
        SFTTrainer(tiny_llama(), args=sft_config(tmp_path), train_dataset=text, peft_config=head)
    wrapped = get_peft_model(tiny_llama(), LoraConfig(**LORA))
    with pytest.raises(ValueError, match=r"already has lorakit adapters \['default'\]"):
        SFTTrainer(wrapped, args=sft_config(tmp_path), train_dataset=text, peft_config=LoraConfig(**LORA))


def test_dpo_trainer_without_ref_model_references_the_base_model_and_loads_no_second_copy(tmp_path):
    from lorakit.integrations import DPOTrainer

    pairs = Dataset.from_dict(PAIRS)
    base = tiny_llama()
    alive = full_models_alive()
    args = trl.DPOConfig(
        tmp_path, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="no", **FAST
    )
    trainer = DPOTrainer(
        base, args=args, train_dataset=pairs, eval_dataset=pairs, processing_class=tokenizer(),
        peft_config=LoraConfig(**LORA),
    )  # fmt: skip
    assert trainer.ref_model is None and full_models_alive() == alive
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference at the first step
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    assert trainer.ref_model is None and full_models_alive() == alive

    batch = next(iter(trainer.get_train_dataloader()))
    reference = trainer.compute_ref_log_probs(trainer.model, batch)
    # the oracle: stock TRL with a second, untouched copy of the base as its reference model
    stock_args = trl.DPOConfig(tmp_path / "stock", save_strategy="no", **FAST)
    stock = trl.DPOTrainer(
        tiny_llama(1),
        ref_model=tiny_llama(),
        args=stock_args,
        train_dataset=pairs,
        processing_class=tokenizer(),
    )
    for got, want, policy in zip(
        reference,
        stock.compute_ref_log_probs(stock.ref_model, batch),
        stock.compute_ref_log_probs(trainer.model, batch),
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got, policy, atol=1e-4)  # the trained adapters are not in the reference


def test_lorakit_integrations_imports_and_its_trainer_works_without_trl():
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import lorakit.integrations as integrations\n"
        "assert issubclass(integrations.Trainer, __import__('transformers').Trainer)\n"
        "try:\n    integrations.SFTTrainer\nexcept ImportError:\n    print('no trl')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no trl"
