"""The users' own articles (/work/shared/seeds/), snippet by snippet, run against lorakit.

Each snippet keeps its code as written, with only ``from peft import ...`` changed to
``from lorakit import ...``. Hub checkpoints are replaced by tiny models built from configs (no network),
and each test asserts what the article says the call does.

* 001 (PEFT LoRA introduction): the LoraConfig option list, the T5 ``LoraModel`` snippet, the GPT-J
  ``prepare_model_for_kbit_training`` + ``get_peft_model`` snippet, and the methods
  add_weighted_adapter / delete_adapter / disable_adapter_layers / enable_adapter_layers /
  merge_and_unload / unload with the ``PeftModel.from_pretrained(...).merge_and_unload()`` usage.
* 002 (LoRA adapters explained): h = W0 x + (alpha/r) B A x, B starts at zero so the initial update is
  zero, and merging adds no inference latency.
* 003 (rsLoRA): ``use_rslora=True`` scales by lora_alpha/sqrt(r); the alignment-handbook LoraConfig.
* 000 and 004 (LoRA+): different learning rates for A and B through a custom Trainer optimizer.
"""

from __future__ import annotations

import math
import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    FalconConfig,
    GPT2Config,
    GPTJConfig,
    LlamaConfig,
    T5Config,
)

from lorakit import LoraConfig, PeftModel, get_peft_model

VOCAB = 64
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 8, 16, 32, 3, 7, 11]])


# ----------------------------------------------------------------------------- tiny models and helpers


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """Three-layer Llama; the same seed gives the same weights."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return AutoModelForCausalLM.from_config(LlamaConfig(**kwargs)).eval()


def tiny_t5(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return AutoModelForSeq2SeqLM.from_config(config).eval()


def tiny_gptj_config(**overrides) -> GPTJConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        rotary_dim=4,
        n_inner=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return GPTJConfig(**kwargs)


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_falcon(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = FalconConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        new_decoder_architecture=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def strip_wrapper_prefix(name: str) -> str:
    """Module name inside the wrapped transformers model (drops PeftModel/LoraModel prefixes)."""
    for prefix in ("base_model.model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The adapted layers (those holding LoRA A matrices), by their name in the base model."""
    found = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        lora_emb_a = getattr(module, "lora_embedding_A", None)
        if (lora_a is not None and len(lora_a) > 0) or (lora_emb_a is not None and len(lora_emb_a) > 0):
            found[strip_wrapper_prefix(name)] = module
    return found


def rank_of(layer: torch.nn.Module, adapter: str = "default") -> int:
    if len(getattr(layer, "lora_embedding_A", {})) > 0:
        return layer.lora_embedding_A[adapter].shape[0]
    return layer.lora_A[adapter].weight.shape[0]


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def t5_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, decoder_input_ids=IDS[:, :4]).logits


def randomize_lora(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Stand-in for training: give every LoRA matrix non-zero values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- 001: LoraConfig options


def test_001_target_modules_list_matches_exact_name_or_suffix():
    # "传递字符串列表时,将执行精确匹配或检查模块名称是否以任何传递的字符串结尾"
    # (as in PEFT, the suffix must start at a "." boundary: "proj" does not match "q_proj")
    config = LoraConfig(target_modules=["q_proj", "mlp.up_proj", "proj"])
    model = get_peft_model(tiny_llama(), config)
    expected = {f"model.layers.{i}.self_attn.q_proj" for i in range(3)}
    expected |= {f"model.layers.{i}.mlp.up_proj" for i in range(3)}
    assert set(lora_layers(model)) == expected


def test_001_target_modules_string_is_a_regex_match():
    # "传递字符串时,将执行正则表达式匹配"
    config = LoraConfig(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj")
    model = get_peft_model(tiny_llama(), config)
    assert set(lora_layers(model)) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


def test_001_all_linear_selects_every_linear_but_the_output_layer():
    # "如果指定为‘all-linear’,则选择所有线性/Conv1D模块,不包括输出层"
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    kinds += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert set(lora_layers(model)) == {f"model.layers.{i}.{k}" for i in range(3) for k in kinds}


def test_001_all_linear_includes_conv1d_and_excludes_lm_head_on_gpt2():
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    kinds = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert set(lora_layers(model)) == {f"transformer.h.{i}.{k}" for i in range(2) for k in kinds}


@pytest.mark.parametrize(
    ("make", "expected_suffixes"),
    [
        (tiny_llama, {"self_attn.q_proj", "self_attn.v_proj"}),
        (tiny_gpt2, {"attn.c_attn"}),
        (tiny_falcon, {"self_attention.query_key_value"}),
    ],
    ids=["llama", "gpt2", "falcon"],
)
def test_001_target_modules_default_per_architecture(make, expected_suffixes):
    # "如果未指定,则根据模型架构选择模块"
    model = get_peft_model(make(), LoraConfig(task_type="CAUSAL_LM"))
    names = set(lora_layers(model))
    assert names, "no layer was adapted"
    assert {name.split(".", 3)[-1] for name in names} == expected_suffixes


def test_001_target_modules_default_on_unknown_architecture_raises():
    # "如果架构未知,则会引发错误——在这种情况下,应手动指定目标模块"
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError):
        get_peft_model(model, LoraConfig())
    # naming the modules by hand works
    peft_model = get_peft_model(model, LoraConfig(target_modules=["0", "2"]))
    assert set(lora_layers(peft_model)) == {"0", "2"}


def test_001_fan_in_fan_out_for_gpt2_conv1d():
    # "gpt-2 使用的 Conv1D 存储权重格式为 (fan_in, fan_out),因此应设置为 True"
    base = tiny_gpt2()
    base_out = logits(base)
    model = get_peft_model(base, LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, r=4))
    layer = lora_layers(model)["transformer.h.0.attn.c_attn"]
    assert tuple(layer.lora_A["default"].weight.shape) == (4, 32)  # r x fan_in
    assert tuple(layer.lora_B["default"].weight.shape) == (96, 4)  # fan_out x r
    randomize_lora(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, base_out, atol=1e-3)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_001_bias_modes_choose_which_biases_train(bias):
    # "bias: 可以是 ‘none’,‘all’ 或 ‘lora_only’。如果是 ‘all’ 或 ‘lora_only’,则相应的偏置将在训练期间更新"
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], bias=bias))

    def norm(name):  # PEFT keeps the wrapped layer's weights under ".base_layer"
        return strip_wrapper_prefix(name).replace(".base_layer", "")

    trainable_biases = {norm(n) for n in trainable_names(model) if n.endswith(".bias")}
    all_biases = {norm(n) for n, _ in model.named_parameters() if n.endswith(".bias")}
    if bias == "none":
        assert trainable_biases == set()
    elif bias == "all":
        assert trainable_biases == all_biases
        assert "transformer.h.0.ln_1.bias" in trainable_biases
    else:
        assert trainable_biases == {f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)}


def test_001_trained_bias_persists_when_adapters_are_disabled():
    # "请注意,这意味着即使禁用适配器,模型也不会生成与未适配的基础模型相同的输出"
    base_out = logits(tiny_gpt2())
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], bias="lora_only"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith(".bias"):
                param.add_(0.5)  # what training would do to the bias
    with model.disable_adapter():
        assert not torch.allclose(logits(model), base_out, atol=1e-3)


def test_001_bias_none_disabled_adapter_gives_base_outputs():
    base_out = logits(tiny_gpt2())
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], bias="none"))
    randomize_lora(model)
    assert not torch.allclose(logits(model), base_out, atol=1e-3)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_out)


def test_001_init_lora_weights_default_gaussian_and_false():
    # True: reference init (B = 0, so the model starts as the base model); "gaussian": A ~ N(0, 1/r);
    # False: random B too ("不推荐使用"), so the outputs change right away.
    base_out = logits(tiny_llama())
    default = get_peft_model(tiny_llama(), LoraConfig(r=8))
    for layer in lora_layers(default).values():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    torch.testing.assert_close(logits(default), base_out)

    gaussian = get_peft_model(tiny_llama(), LoraConfig(r=8, init_lora_weights="gaussian"))
    a = torch.cat([layer.lora_A["default"].weight.flatten() for layer in lora_layers(gaussian).values()])
    assert a.std().item() == pytest.approx(1 / 8, rel=0.15)
    for layer in lora_layers(gaussian).values():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0

    random_init = get_peft_model(tiny_llama(), LoraConfig(r=8, init_lora_weights=False))
    for layer in lora_layers(random_init).values():
        assert torch.count_nonzero(layer.lora_B["default"].weight) > 0
    assert not torch.allclose(logits(random_init), base_out, atol=1e-4)


@pytest.mark.parametrize(("layers", "expected"), [([0, 2], {0, 2}), (1, {1})], ids=["list", "int"])
def test_001_layers_to_transform_and_layers_pattern(layers, expected):
    # "如果传递了整数列表,则会对列表中指定的层索引应用适配器。如果传递单个整数,则会对该索引处的层应用转换"
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"], layers_to_transform=layers, layers_pattern="layers"
    )
    model = get_peft_model(tiny_llama(), config)
    names = set(lora_layers(model))
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in expected for p in ("q_proj", "v_proj")}


def test_001_rank_pattern_and_alpha_pattern():
    # "层名称或正则表达式到与默认 r / lora_alpha 不同的秩 / alpha 的映射"
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj"],
        rank_pattern={"v_proj": 4, r"layers\.0\.self_attn\.q_proj": 2},
        alpha_pattern={"k_proj": 32},
    )
    layers = lora_layers(get_peft_model(tiny_llama(), config))
    for i in range(3):
        q, k, v = (layers[f"model.layers.{i}.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj"))
        q_rank = 2 if i == 0 else 8
        assert (rank_of(q), rank_of(k), rank_of(v)) == (q_rank, 8, 4)
        assert q.scaling["default"] == pytest.approx(16 / q_rank)
        assert k.scaling["default"] == pytest.approx(32 / 8)
        assert v.scaling["default"] == pytest.approx(16 / 4)


# ----------------------------------------------------------------------------- 001: T5 LoraModel snippet


def test_001_t5_lora_model_snippet():
    from lorakit import LoraConfig, LoraModel

    # 设置 LoRA 配置
    config = LoraConfig(
        task_type="SEQ_2_SEQ_LM",  # 任务类型为序列到序列语言模型
        r=8,  # LoRA 的秩
        lora_alpha=32,  # LoRA 的缩放因子
        target_modules=["q", "v"],  # 目标模块列表
        lora_dropout=0.01,  # LoRA 层的 dropout 概率
    )

    # 加载预训练的 T5 基础模型 -- here a tiny T5 built from a config instead of "t5-base"
    model = tiny_t5()
    base_out = t5_logits(tiny_t5())

    # 创建 LoRA 模型
    lora_model = LoraModel(model, config, "default")

    layers = lora_layers(lora_model)
    expected = {f"encoder.block.{i}.layer.0.SelfAttention.{p}" for i in range(2) for p in "qv"}
    expected |= {f"decoder.block.{i}.layer.0.SelfAttention.{p}" for i in range(2) for p in "qv"}
    expected |= {f"decoder.block.{i}.layer.1.EncDecAttention.{p}" for i in range(2) for p in "qv"}
    assert set(layers) == expected
    for layer in layers.values():
        assert rank_of(layer) == 8
        assert layer.scaling["default"] == pytest.approx(32 / 8)
        assert layer.lora_dropout["default"].p == pytest.approx(0.01)
    # only the LoRA matrices train; the new LoRA model starts out equal to the base model
    trainable = trainable_names(lora_model)
    assert trainable and all("lora_" in name for name in trainable)
    assert sum(p.numel() for n, p in lora_model.named_parameters() if n in trainable) == 12 * (8 * 32 * 2)
    torch.testing.assert_close(t5_logits(lora_model), base_out)


# ----------------------------------------------------------------------------- 001: GPT-J k-bit snippet


def gptj_snippet() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The article's GPT-J snippet; returns (model after prepare_model_for_kbit_training, lora_model)."""
    from lorakit import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # 设置 LoRA 参数
    rank = 0  # device index in the article (device_map={"": rank}); unused on CPU
    target_modules = ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out", "wte"]
    config = LoraConfig(
        r=4,  # LoRA 的秩
        lora_alpha=16,  # LoRA 的缩放因子
        target_modules=target_modules,  # 目标模块列表
        lora_dropout=0.1,  # LoRA 层的 dropout 概率
        bias="none",  # 无偏置
        task_type="CAUSAL_LM",  # 任务类型为因果语言模型
    )

    # The article's `quantization_config = transformers.BitsAndBytesConfig(load_in_8bit=True)` is dropped:
    # no bitsandbytes/GPU here, so the model stays unquantized. The "kakaobrain/kogpt" tokenizer is
    # dropped too (no hub); its eos id is the tiny vocabulary's 2.
    del rank
    torch.manual_seed(0)
    model = transformers.GPTJForCausalLM(tiny_gptj_config(pad_token_id=2, use_cache=False))
    model = model.to(torch.float16)  # torch_dtype=torch.float16, as in the article

    # 准备模型进行 k-bit 训练
    model = prepare_model_for_kbit_training(model)
    prepared_snapshot = {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
    }

    # 获取 LoRA 模型
    lora_model = get_peft_model(model, config)
    return prepared_snapshot, lora_model


def test_001_gptj_prepare_model_for_kbit_training():
    snapshot, lora_model = gptj_snippet()
    # the base model is frozen ...
    assert not any(snapshot["requires_grad"].values())
    # ... its norm layers are upcast to fp32 (PEFT upcasts every fp16 parameter of an unquantized model;
    # lorakit only the norm layers -- see README "Differences from PEFT"; both satisfy this) ...
    norm_params = [n for n in snapshot["dtypes"] if ".ln_" in n]
    assert norm_params
    assert all(snapshot["dtypes"][n] == torch.float32 for n in norm_params)
    # ... gradient checkpointing is on and the input embeddings' output requires grad. (PEFT 0.21.2 does
    # these two only for quantized models; lorakit does them for unquantized ones too, so that the
    # article's snippet still trains with checkpointing once its 8-bit quantization is dropped.)
    base = lora_model.get_base_model()
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    assert base.get_input_embeddings()(IDS).requires_grad


def test_001_gptj_get_peft_model_targets_and_trains():
    _, lora_model = gptj_snippet()
    layers = lora_layers(lora_model)
    kinds = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"]
    expected = {f"transformer.h.{i}.{k}" for i in range(2) for k in kinds} | {"transformer.wte"}
    assert set(layers) == expected  # lm_head is not adapted
    assert len(getattr(layers["transformer.wte"], "lora_embedding_A", {})) == 1  # LoRA on the embedding
    for layer in layers.values():
        assert rank_of(layer) == 4
        assert layer.scaling["default"] == pytest.approx(16 / 4)

    trainable = trainable_names(lora_model)
    assert trainable and all("lora_" in name for name in trainable)

    # one training step with gradient checkpointing: gradients reach every adapted layer (one of its two
    # matrices starts at zero, so the other one's gradient is zero on this first step) and nothing else
    lora_model.train()
    out = lora_model(input_ids=IDS, labels=IDS)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in lora_model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    for name, layer in layers.items():
        grads = [p.grad for n, p in layer.named_parameters() if "lora_" in n]
        assert grads and all(g is not None for g in grads), name
        assert any(torch.count_nonzero(g) > 0 for g in grads), name


# ----------------------------------------------------------------------------- 001: model methods


def test_001_delete_adapter_removes_its_parameters():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, seed=1)
    before = logits(model)
    n_params = sum(1 for _ in model.parameters())
    model.add_adapter("other", LoraConfig(target_modules=["q_proj", "v_proj", "o_proj"], r=2))
    assert any(".other" in name for name, _ in model.named_parameters())

    model.delete_adapter("other")

    assert "other" not in model.peft_config
    assert not any(".other" in name for name, _ in model.named_parameters())
    assert sum(1 for _ in model.parameters()) == n_params
    for layer in lora_layers(model).values():
        assert "other" not in layer.lora_A and "other" not in layer.scaling
    assert "other" not in str(model.state_dict().keys())
    torch.testing.assert_close(logits(model), before)


def test_001_disable_and_enable_adapter_layers():
    base_out = logits(tiny_llama())
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, base_out, atol=1e-3)

    model.disable_adapter_layers()  # "模型中的所有适配器层将被禁用" -> the base model's outputs
    torch.testing.assert_close(logits(model), base_out)
    model.enable_adapter_layers()  # "与调用disable_adapter_layers方法相反"
    torch.testing.assert_close(logits(model), adapted)

    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_out)
    torch.testing.assert_close(logits(model), adapted)


def saved_falcon_adapter(path) -> torch.Tensor:
    """Stand-in for the hub adapter "smangrul/falcon-40B-int4-peft-lora-sfttrainer-sample"."""
    model = get_peft_model(tiny_falcon(), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    model.save_pretrained(path)
    return logits(model)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"progressbar": True, "safe_merge": True, "adapter_names": ["default"]}],
    ids=["defaults", "progressbar-safe_merge-adapter_names"],
)
def test_001_from_pretrained_then_merge_and_unload_snippet(tmp_path, kwargs):
    from transformers import AutoModelForCausalLM  # noqa: F401,F811  (the snippet's imports)

    from lorakit import PeftModel

    adapted = saved_falcon_adapter(tmp_path / "falcon-lora")
    base_out = logits(tiny_falcon())

    # 从预训练模型中加载基础模型 -- a tiny Falcon built from a config instead of "tiiuae/falcon-40b"
    base_model = tiny_falcon()
    # PEFT 模型的 ID -- a local folder written by save_pretrained instead of a hub id
    peft_model_id = str(tmp_path / "falcon-lora")
    # 从预训练模型和 PEFT 模型 ID 中加载 PEFT 模型
    model = PeftModel.from_pretrained(base_model, peft_model_id)
    # 合并 PEFT 模型并卸载不需要的部分
    merged_model = model.merge_and_unload(**kwargs)

    assert type(merged_model) is type(tiny_falcon())
    assert not isinstance(merged_model, PeftModel)
    assert not any("lora_" in name for name, _ in merged_model.named_modules())
    assert set(merged_model.state_dict()) == set(tiny_falcon().state_dict())
    merged_out = logits(merged_model)
    torch.testing.assert_close(merged_out, adapted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged_out, base_out, atol=1e-3)


def test_001_merge_and_unload_safe_merge_detects_nan():
    # "safe_merge: 是否启用安全合并检查,以检查适配器权重中是否存在潜在的 NaN 值"
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    layer = lora_layers(model)["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError):
        model.merge_and_unload(safe_merge=True)


def test_001_merge_and_unload_adapter_names_selects_adapters():
    # "adapter_names: 要合并的适配器名称列表。如果为 None,则合并所有活动适配器"
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    model.set_adapter("other")
    other_out = logits(model)
    model.set_adapter("default")
    default_out = logits(model)
    assert not torch.allclose(other_out, default_out, atol=1e-3)

    merged = model.merge_and_unload(adapter_names=["other"])
    assert not any("lora_" in name for name, _ in merged.named_modules())
    torch.testing.assert_close(logits(merged), other_out, atol=1e-5, rtol=1e-5)


def test_001_unload_returns_the_base_model_without_merging():
    base = tiny_llama()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base_out = logits(base)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj", "gate_proj"]))
    randomize_lora(model)
    assert not torch.allclose(logits(model), base_out, atol=1e-3)

    unloaded = model.unload()

    assert type(unloaded) is type(tiny_llama())
    assert not any("lora_" in name for name, _ in unloaded.named_modules())
    state = unloaded.state_dict()
    assert set(state) == set(base_state)
    for key, value in base_state.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    torch.testing.assert_close(logits(unloaded), base_out)


def test_001_add_weighted_adapter_linear_combination():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    randomize_lora(model)
    model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="cat")
    assert "mix" in model.peft_config
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert rank_of(layer, "mix") == 8  # "cat": rank is the sum of the ranks

    def delta(name):
        return layer.get_delta_weight(name)

    torch.testing.assert_close(delta("mix"), 0.5 * delta("default") + 0.5 * delta("b"), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- 002: how LoRA computes


def test_002_forward_is_base_plus_scaled_low_rank_update():
    # h = W0 x + (alpha / r) B A x, with W0 frozen and only A, B trained
    config = LoraConfig(
        target_modules=["q_proj"], r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False
    )
    model = get_peft_model(tiny_llama(), config)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    base_layer = layer.base_layer
    assert not any(p.requires_grad for p in base_layer.parameters())
    x = torch.randn(3, 32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        expected = base_layer(x) + (8 / 4) * (x @ a.T @ b.T)
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_002_frozen_w0_is_the_original_layer():
    # W0 stays frozen inside the adapted layer; PEFT's get_base_layer() hands back the original module
    base = tiny_llama()
    original = base.model.layers[0].self_attn.q_proj
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer is not original
    assert layer.get_base_layer() is original
    assert not original.weight.requires_grad


def test_002_merge_adds_scaled_BA_to_the_weight_so_no_extra_latency():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["v_proj"], r=4, lora_alpha=8))
    randomize_lora(model)
    adapted = logits(model)
    layer = lora_layers(model)["model.layers.2.self_attn.v_proj"]
    w0 = layer.base_layer.weight.detach().clone()
    delta = (8 / 4) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0 + delta.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- 003: rsLoRA


def test_003_rslora_snippet_scales_by_alpha_over_sqrt_r():
    from lorakit import LoraConfig, get_peft_model

    base_model = tiny_llama()  # AutoModelForCausalLM.from_pretrained(...)
    # initialize the config as usual but with "use_rslora = True"
    lora_config = LoraConfig(r=16, lora_alpha=8, task_type="CAUSAL_LM", use_rslora=True)
    peft_model = get_peft_model(base_model, lora_config)

    layers = lora_layers(peft_model)
    assert len(layers) == 6  # q_proj and v_proj (the Llama default) in 3 layers
    for layer in layers.values():
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(16))


def test_003_rslora_alpha_16_rank_256_equals_plain_lora_alpha_256():
    # "using rsLoRA with an alpha of 16 and rank 256 means, lora_alpha = 16*(256**.5) = 256"
    outs = []
    for use_rslora, alpha in ((True, 16), (False, 256)):
        config = LoraConfig(
            r=256, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["q_proj", "o_proj"]
        )
        model = get_peft_model(tiny_llama(), config)
        randomize_lora(model, scale=0.02)
        for layer in lora_layers(model).values():
            assert layer.scaling["default"] == pytest.approx(1.0)
        outs.append(logits(model))
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0], logits(tiny_llama()), atol=1e-3)


@pytest.mark.parametrize("lora_modules_to_save", [None, ["lm_head"]], ids=["no-modules_to_save", "lm_head"])
def test_003_alignment_handbook_lora_config(tmp_path, lora_modules_to_save):
    model_args = types.SimpleNamespace(
        lora_r=16,
        lora_alpha=16,
        lora_dropout=0.1,
        lora_target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "gate_proj"],
        lora_modules_to_save=lora_modules_to_save,
    )
    peft_config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=model_args.lora_target_modules,
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=True,
    )
    base_out = logits(tiny_llama(attention_bias=True))
    model = get_peft_model(tiny_llama(attention_bias=True), peft_config)
    assert isinstance(model, PeftModel)

    layers = lora_layers(model)
    kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.gate_proj"]
    assert set(layers) == {f"model.layers.{i}.{k}" for i in range(3) for k in kinds}  # not v_proj/down_proj
    for layer in layers.values():
        assert layer.scaling["default"] == pytest.approx(16 / math.sqrt(16))
        assert layer.lora_dropout["default"].p == pytest.approx(0.1)

    trainable = trainable_names(model)
    assert not any(name.endswith(".bias") for name in trainable)  # bias="none"
    lora_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    lm_head_numel = VOCAB * 32 if lora_modules_to_save else 0
    assert n_trainable == lora_numel + lm_head_numel
    torch.testing.assert_close(logits(model), base_out)  # B starts at zero; lm_head copy is unchanged

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert ("base_model.model.lm_head.weight" in saved) == bool(lora_modules_to_save)
    assert len([k for k in saved if "lora_" in k]) == 2 * len(layers)


# ----------------------------------------------------------------------------- 000 / 004: LoRA+


def test_000_004_loraplus_optimizer_gives_B_a_larger_learning_rate():
    from lorakit.optimizers import create_loraplus_optimizer

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    optimizer = create_loraplus_optimizer(
        model=model, optimizer_cls=torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=2**4
    )
    lr_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            lr_of[names[id(param)]] = group["lr"]
    assert lr_of and all(lr == pytest.approx(1e-4 * 16) for n, lr in lr_of.items() if "lora_B" in n)
    assert all(lr == pytest.approx(1e-4) for n, lr in lr_of.items() if "lora_A" in n)
