"""Bottleneck adapters (series and parallel): math, presets on four architectures, lifecycle, files."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

from lorakit import BottleneckConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from lorakit.optimizers import create_loraplus_optimizer
from lorakit.training import LoraPlusTrainer, LoraPlusTrainingArguments
from lorakit.tuners.bottleneck.layer import BottleneckLayer
from lorakit.tuners.lora.layer import LoraLayer
from tests.helpers import assert_same_state, randomize_adapters, state_snapshot, tiny_llama
from tests.training.test_loraplus import Tokens, lr_and_decay_by_name

ARCHITECTURES = ("bert", "llama", "gpt2", "t5")
PRESETS = ("houlsby", "pfeiffer", "parallel")
HIDDEN, FFN, M = 32, 64, 4  # every tiny model: hidden size 32, feed-forward width 64; m = 32 // 8


def tiny(arch: str, seed: int = 0) -> nn.Module:
    """Two-block models with hidden size 32 and a 100-token vocabulary (no downloads)."""
    torch.manual_seed(seed)
    if arch == "llama":
        return tiny_llama(seed)
    if arch == "bert":
        config = BertConfig(
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=100,
        )
        return BertModel(config, add_pooling_layer=False).eval()
    if arch == "gpt2":
        config = GPT2Config(n_embd=HIDDEN, n_inner=FFN, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
        return GPT2LMHeadModel(config).eval()
    config = T5Config(d_model=HIDDEN, d_ff=FFN, d_kv=8, num_layers=2, num_heads=4, vocab_size=100)
    return T5ForConditionalGeneration(config).eval()


def inputs(arch: str) -> dict:
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "decoder_input_ids": ids[:, :5]} if arch == "t5" else {"input_ids": ids}


def output(model: nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(arch))[0]


def preset(name: str, arch: str, **overrides) -> BottleneckConfig:
    return BottleneckConfig.from_preset(name, arch, **{"reduction_factor": 8, **overrides})


def insertion_params(d_in: int, d_out: int, m: int) -> int:
    """down (m, d_in) + bias m, up (d_out, m) + bias d_out; series (d_in = d_out = d): 2 d m + m + d."""
    return d_in * m + m + m * d_out + d_out


# (insertion points, width of the adapter's input) per architecture and preset, from the papers'
# placements: Houlsby after every attention output and feed-forward output, Pfeiffer after the
# feed-forward, parallel beside the feed-forward (BERT: beside its output projection, input 64).
# T5 has 2 encoder blocks (self-attention, FFN) and 2 decoder blocks (self-, cross-attention, FFN).
PLACEMENT_COUNTS = {
    ("bert", "houlsby"): (4, HIDDEN),
    ("bert", "pfeiffer"): (2, HIDDEN),
    ("bert", "parallel"): (2, FFN),
    ("llama", "houlsby"): (4, HIDDEN),
    ("llama", "pfeiffer"): (2, HIDDEN),
    ("llama", "parallel"): (2, HIDDEN),
    ("gpt2", "houlsby"): (4, HIDDEN),
    ("gpt2", "pfeiffer"): (2, HIDDEN),
    ("gpt2", "parallel"): (2, HIDDEN),
    ("t5", "houlsby"): (10, HIDDEN),
    ("t5", "pfeiffer"): (4, HIDDEN),
    ("t5", "parallel"): (4, HIDDEN),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_leaves_every_architecture_unchanged_at_step_0(name, arch):
    base = tiny(arch)
    expected = output(base, arch)
    model = get_peft_model(base, preset(name, arch))
    torch.testing.assert_close(output(model, arch), expected, rtol=0, atol=0)
    randomize_adapters(model)  # the adapters are in the forward: once non-zero, the output moves
    assert not torch.allclose(output(model, arch), expected, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count_is_the_formula_per_insertion_point(name, arch):
    model = get_peft_model(tiny(arch), preset(name, arch))
    points, d_in = PLACEMENT_COUNTS[(arch, name)]
    layers = [m for m in model.modules() if isinstance(m, BottleneckLayer)]
    assert len(layers) == points
    assert model.get_nb_trainable_parameters()[0] == points * insertion_params(d_in, HIDDEN, M)


def test_layer_norm_and_learned_scaling_add_their_parameters():
    plain = get_peft_model(tiny_llama(), BottleneckConfig(target_modules=["o_proj"], bottleneck_size=M))
    extra = get_peft_model(
        tiny_llama(),
        BottleneckConfig(target_modules=["o_proj"], bottleneck_size=M, layer_norm=True, scaling="learned"),
    )
    # per insertion: a LayerNorm (weight and bias of width 32) and one scalar
    assert extra.get_nb_trainable_parameters()[0] - plain.get_nb_trainable_parameters()[0] == 2 * (
        2 * HIDDEN + 1
    )


def test_presets_target_the_papers_sublayers():
    houlsby = preset("double_seq_bn", "llama")  # AdapterHub's names are accepted
    assert houlsby.target_modules == {"self_attn.o_proj", "mlp.down_proj"} and houlsby.mode == "series"
    pfeiffer = preset("seq_bn", "bert")
    assert pfeiffer.target_modules == {"output.dense"}
    assert pfeiffer.exclude_modules == {"attention.output.dense"}
    parallel = preset("par_bn", "gpt2")
    assert (parallel.target_modules, parallel.mode, parallel.scaling) == ({"mlp"}, "parallel", 4.0)
    with_norms = BottleneckConfig.houlsby("llama", train_layer_norms=True)
    assert with_norms.modules_to_save == ["input_layernorm", "post_attention_layernorm"]
    assert BottleneckConfig.pfeiffer("mistral").target_modules == {"mlp.down_proj"}


class Sublayer(nn.Module):
    """A sublayer called with `hidden_states=` that returns a tuple, as attention modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden_states, factor=1.0):
        return self.proj(hidden_states) * factor, "extra"


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(hidden_size=4)
        self.inner = Sublayer()
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        hidden, extra = self.inner(hidden_states=self.head(x), factor=2.0)
        assert extra == "extra"
        return hidden


def adapter_by_definition(layer: BottleneckLayer, name: str, h: torch.Tensor, act, scale) -> torch.Tensor:
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    if name in layer.adapter_layer_norm:
        norm = layer.adapter_layer_norm[name]
        h = F.layer_norm(h, (h.shape[-1],), norm.weight, norm.bias, norm.eps)
    return scale * (act(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)


def test_series_parallel_and_their_sum_follow_the_definitions():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    model = get_peft_model(
        Toy(),
        BottleneckConfig(
            target_modules=["inner"],
            bottleneck_size=2,
            non_linearity="silu",
            layer_norm=True,
            scaling="learned",
        ),
        adapter_name="series",
    )
    model.add_adapter(
        "parallel",
        BottleneckConfig(
            target_modules=["head"], mode="parallel", bottleneck_size=3, non_linearity="tanh", scaling=0.5
        ),
    )
    model.add_adapter(
        "parallel_inner",
        BottleneckConfig(target_modules=["inner"], mode="parallel", bottleneck_size=3, non_linearity="gelu"),
    )
    randomize_adapters(model)
    base = model.get_base_model()
    inner, head = base.inner, base.head
    with torch.no_grad():
        inner.adapter_scale["series"].fill_(0.7)
        h = head.base_layer(x)
        f = inner.base_layer(h, factor=2.0)[0]
        model.set_adapter("series")
        expected = f + adapter_by_definition(inner, "series", f, F.silu, 0.7)
        torch.testing.assert_close(model(x), expected)

        model.set_adapter("parallel")  # parallel: the Linear's input x, added to its output
        h_par = head.base_layer(x) + adapter_by_definition(head, "parallel", x, torch.tanh, 0.5)
        torch.testing.assert_close(model(x), inner.base_layer(h_par, factor=2.0)[0])

        model.set_adapter(["series", "parallel_inner"])  # several adapters: each from f's own output/input
        expected = f + adapter_by_definition(inner, "series", f, F.silu, 0.7)
        expected = expected + adapter_by_definition(inner, "parallel_inner", h, F.gelu, 1.0)
        torch.testing.assert_close(model(x), expected)


def test_save_and_load_round_trip_uses_documented_keys(tmp_path):
    config = BottleneckConfig(
        target_modules=["o_proj", "mlp"],
        bottleneck_size=M,
        layer_norm=True,
        scaling="learned",
        mode="parallel",
    )
    model = get_peft_model(tiny_llama(), config)
    randomize_adapters(model)
    ids = inputs("llama")["input_ids"]
    expected = model(input_ids=ids).logits.detach()
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["mode"] == "parallel"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.mlp."
    assert {
        prefix + k
        for k in ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
    } <= keys
    assert {
        prefix + "adapter_layer_norm.weight",
        prefix + "adapter_layer_norm.bias",
        prefix + "adapter_scale",
    } <= keys
    assert len(keys) == 4 * 7  # 2 layers x (o_proj, mlp) x 7 tensors; no adapter name in any key
    assert isinstance(PeftConfig.from_pretrained(tmp_path), BottleneckConfig)

    fresh = tiny_llama(seed=5)  # other base weights would give other outputs: reload on the same base
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_several_adapters_switch_and_inactive_ones_freeze(tmp_path):
    model = get_peft_model(tiny_llama(), BottleneckConfig.pfeiffer("llama", bottleneck_size=M))
    model.add_adapter("par", BottleneckConfig.houlsby("llama", bottleneck_size=2, mode="parallel"))
    randomize_adapters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_adapter("par")
    ids = inputs("llama")["input_ids"]
    out_par = model(input_ids=ids).logits.detach()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".par." in n for n in trainable)
    model.set_adapter("default")
    out_default = model(input_ids=ids).logits.detach()
    assert not torch.allclose(out_default, out_par, atol=1e-4)
    model.save_pretrained(tmp_path)
    # each adapter alone, loaded onto the untouched base, gives the output it gave when active
    alone = PeftModel.from_pretrained(tiny_llama(), tmp_path / "par")
    torch.testing.assert_close(alone(input_ids=ids).logits, out_par, rtol=0, atol=0)
    alone = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(alone(input_ids=ids).logits, out_default, rtol=0, atol=0)


def test_disable_adapter_gives_the_base_model_and_restores_after(llama, input_ids):
    base = llama(input_ids=input_ids).logits.detach()
    model = get_peft_model(llama, BottleneckConfig.houlsby("llama", bottleneck_size=M))
    randomize_adapters(model)
    adapted = model(input_ids=input_ids).logits.detach()
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=input_ids).logits, base, rtol=0, atol=0)
    torch.testing.assert_close(model(input_ids=input_ids).logits, adapted, rtol=0, atol=0)


def test_delete_adapter_removes_its_parameters_and_keeps_the_other(llama, input_ids):
    model = get_peft_model(llama, BottleneckConfig.pfeiffer("llama", bottleneck_size=M))
    model.add_adapter("other", BottleneckConfig.houlsby("llama", bottleneck_size=2))
    randomize_adapters(model)
    model.set_adapter("other")
    expected = model(input_ids=input_ids).logits.detach()
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"] and model.active_adapters == ["other"]
    assert not any(".default." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=0)


def test_merge_and_unload_refuses_and_leaves_the_model_untouched(llama):
    model = get_peft_model(llama, BottleneckConfig.houlsby("llama", bottleneck_size=M))
    randomize_adapters(model)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="cannot be merged: its non-linearity .* unload()"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    assert_same_state(before, state_snapshot(model))


def test_unload_restores_the_base_model_exactly(input_ids):
    reference = state_snapshot(tiny_llama())
    expected = tiny_llama()(input_ids=input_ids).logits.detach()
    model = get_peft_model(
        tiny_llama(), BottleneckConfig.parallel("llama", bottleneck_size=M, layer_norm=True)
    )
    model.add_adapter("series", BottleneckConfig(target_modules=["mlp", "o_proj"], bottleneck_size=M))
    randomize_adapters(model)
    base = model.unload()
    after = state_snapshot(base)
    assert after["tree"] == reference["tree"]  # every wrapper gone, the original modules back
    assert after["tensors"].keys() == reference["tensors"].keys()
    for key, value in reference["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key
    torch.testing.assert_close(base(input_ids=input_ids).logits, expected, rtol=0, atol=0)


def test_lora_and_bottleneck_adapters_live_on_one_model_and_reload(tmp_path, input_ids):
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="lora"
    )
    model.add_adapter("bn", BottleneckConfig.houlsby("llama", bottleneck_size=M))
    randomize_adapters(model)
    outputs = {}
    for active in ("lora", "bn", ["lora", "bn"]):
        model.set_adapter(active)
        outputs[str(active)] = model(input_ids=input_ids).logits.detach()
    assert not torch.allclose(outputs["lora"], outputs["bn"], atol=1e-4)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "bn" / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora", adapter_name="lora")
    reloaded.load_adapter(tmp_path / "bn", adapter_name="bn")
    for active in ("lora", "bn", ["lora", "bn"]):
        reloaded.set_adapter(active)
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, outputs[str(active)], rtol=0, atol=0)
    # merging the LoRA adapter alone works; the bottleneck layers are dropped as unloaded
    merged = reloaded.merge_and_unload(adapter_names=["lora"])
    assert not any(isinstance(m, (LoraLayer, BottleneckLayer)) for m in merged.modules())
    torch.testing.assert_close(merged(input_ids=input_ids).logits, outputs["lora"], atol=1e-5, rtol=1e-5)


def test_a_module_takes_adapters_of_one_family_only():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["down_proj"]))
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="holds LoRA adapters"):
        model.add_adapter("bn", BottleneckConfig(target_modules=["down_proj"], bottleneck_size=M))
    with pytest.raises(ValueError, match="contains LoRA-adapted 'model.layers.0.mlp.down_proj'"):
        model.add_adapter("bn", BottleneckConfig(target_modules=["mlp"], bottleneck_size=M))
    assert_same_state(before, state_snapshot(model))
    model = get_peft_model(tiny_llama(), BottleneckConfig(target_modules=["o_proj"], bottleneck_size=M))
    with pytest.raises(ValueError, match="bottleneck.*LoRA cannot adapt"):
        model.add_adapter("lora", LoraConfig(r=4, target_modules=["o_proj"]))
    model.add_adapter("lora", LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(
        ValueError, match="'default' is a BOTTLENECK adapter; add_weighted_adapter combines LoRA"
    ):
        model.add_weighted_adapter(["default", "lora"], [1.0, 1.0], "both", combination_type="cat")


def test_all_linear_lora_skips_bottleneck_layers_and_their_projections():
    model = get_peft_model(
        tiny_llama(), BottleneckConfig.houlsby("llama", bottleneck_size=M), adapter_name="bn"
    )
    model.add_adapter("lora", LoraConfig(r=2, target_modules="all-linear"))
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted and not any(n.endswith(("o_proj", "down_proj")) or "adapter_" in n for n in adapted)
    assert sum(n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) for n in adapted) == 10


def test_loraplus_gives_the_up_projection_the_ratio_and_the_down_projection_lr():
    model = get_peft_model(
        tiny_llama(),
        BottleneckConfig(target_modules=["o_proj"], bottleneck_size=M, scaling="learned", layer_norm=True),
    )
    optimizer = create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8, loraplus_weight_decay=0.1
    )
    groups = {
        name.split(".o_proj.")[1]: rate
        for name, rate in lr_and_decay_by_name(model, optimizer).items()
        if ".layers.0." in name
    }
    assert groups == pytest.approx(
        {
            "adapter_down.default.weight": (1e-3, 0.1),
            "adapter_up.default.weight": (8e-3, 0.1),
            "adapter_down.default.bias": (8e-3, 0.0),
            "adapter_up.default.bias": (8e-3, 0.0),
            "adapter_layer_norm.default.weight": (8e-3, 0.0),
            "adapter_layer_norm.default.bias": (8e-3, 0.0),
            "adapter_scale.default": (8e-3, 0.0),
        }
    )


def test_loraplus_trainer_trains_a_bottleneck_model(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), BottleneckConfig.houlsby("llama", bottleneck_size=M))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = Tokens()

    def loss() -> float:
        with torch.no_grad():
            return model(input_ids=data.ids, labels=data.ids).loss.item()

    loss_before = loss()
    args = LoraPlusTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        loraplus_lr_ratio=4,
    )
    trainer = LoraPlusTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    rates = {g.get("initial_lr", g["lr"]) for g in trainer.optimizer.param_groups}
    assert rates == {1e-2, 4e-2}  # down-projections at lr, up-projections and biases at 4 x lr
    model.eval()
    assert loss() < loss_before
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"target_modules": ["o_proj"], "bottleneck_size": 4, "non_linearity": "swish"},
            "non_linearity='swish'",
        ),
        ({"target_modules": ["o_proj"], "bottleneck_size": 4, "reduction_factor": 8}, "exactly one of"),
        ({"target_modules": ["o_proj"]}, "exactly one of bottleneck_size and reduction_factor"),
        ({"target_modules": ["o_proj"], "bottleneck_size": 0}, "bottleneck_size=0"),
        ({"target_modules": ["o_proj"], "bottleneck_size": 4, "mode": "serial"}, "mode='serial'"),
        ({"target_modules": ["o_proj"], "bottleneck_size": 4, "scaling": "auto"}, "scaling='auto'"),
        (
            {"target_modules": ["o_proj"], "bottleneck_size": 4, "dropout": 1.0},
            r"dropout=1.0 must be in \[0, 1\)",
        ),
        (
            {"target_modules": "o_proj", "bottleneck_size": 4, "layers_to_transform": [0]},
            "regex target_modules",
        ),
    ],
)
def test_bad_configs_raise_and_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(**kwargs)


@pytest.mark.parametrize(
    "target, message",
    [
        (["o_prj"], "matched no module of the model; did you mean 'o_proj'"),
        (["embed_tokens"], "cannot take a bottleneck adapter: an embedding's input is token ids"),
        (["mlp", "down_proj"], "matched both 'model.layers.0.mlp' and its submodule"),
        (["layers"], "is not a sublayer"),
    ],
)
def test_bad_targets_raise_and_leave_the_model_unchanged(target, message):
    llama = tiny_llama()
    before = state_snapshot(llama)
    with pytest.raises(ValueError, match=message):
        get_peft_model(llama, BottleneckConfig(target_modules=target, bottleneck_size=M))
    assert_same_state(before, state_snapshot(llama))


def test_unknown_presets_and_architectures_say_what_is_known():
    with pytest.raises(ValueError, match="preset='lora' is unknown; use 'houlsby', 'pfeiffer' or 'parallel'"):
        BottleneckConfig.from_preset("lora", "bert")
    with pytest.raises(ValueError, match=r"No bottleneck preset for model_type='bloom' \(known: .*'gpt2'"):
        BottleneckConfig.houlsby("bloom")


def test_default_targets_follow_the_model_type():
    model = get_peft_model(tiny_llama(), BottleneckConfig(bottleneck_size=M))
    assert model.peft_config["default"].target_modules == {"mlp.down_proj"}
    model = get_peft_model(tiny_llama(), BottleneckConfig(bottleneck_size=M, mode="parallel"))
    assert model.peft_config["default"].target_modules == {"mlp"}
    with pytest.raises(ValueError, match="no default bottleneck placement for model_type=None"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), BottleneckConfig(bottleneck_size=2))


def test_a_generic_sublayer_without_known_sizes_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 4))

        def forward(self, x):
            return self.block(x)

    with pytest.raises(ValueError, match="Cannot tell the input and output sizes of 'block'"):
        get_peft_model(Net(), BottleneckConfig(target_modules=["block"], bottleneck_size=2))
