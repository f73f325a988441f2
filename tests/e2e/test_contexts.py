"""Execution contexts x features: lorakit's fast paths give the plain LoRA formula everywhere.

lorakit computes an adapted linear layer by fused autograd Functions (`kernels/linear.py`), groups
sibling projections that read one input (`kernels/grouped.py`) and rebuilds layer inputs in
backward (`kernels/replay.py`). Each must be exact in every context it runs in, or step aside.

Rows (features): one adapter; two active adapters; lora_dropout > 0 (train mode, fixed seed);
DoRA; a mixed batch (`adapter_names=`, one name per sample, "__base__" included).
Columns (contexts): inference_mode (forward and generate), no_grad, four threads, torch.compile
(across set_adapter / merge / unmerge and shapes), gradient checkpointing (reentrant and not),
CPU bf16 autocast, bf16 and fp16 base models, torch.func.functional_call, hooks on adapted
modules, deepcopy, pickle, a state_dict round trip, batch sizes 0 and 1, sequence length 1,
non-contiguous inputs, backward twice (retain_graph) and a gradient penalty (double backward).

The reference is PEFT 0.21.2 holding the same weights (`y = x W^T + b + (alpha/r) B A x` per
adapted layer, PEFT's DoRA formula for DoRA), run eagerly, single-threaded, outside the context
under test (except where the context is the arithmetic: autocast and half-precision bases run the
reference in the same dtype). lorakit runs every case twice: sibling groups are learned on the
first call and used from the second, so the second call is the grouped fast path.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import pickle
import threading

import peft
import pytest
import torch
from torch.func import functional_call

from tests.oracle.oracle_helpers import base_model, lora_config, lorakit, perturb_adapters

pytestmark = pytest.mark.filterwarnings("ignore")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FIRST = dict(r=4, lora_alpha=8, target_modules=TARGETS)
# a second adapter on some of the layers (siblings q/k, and up without gate), another rank and alpha
SECOND = dict(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"])
ADAPTER_NOISE = 0.05  # adapters change the logits by about as much as they are large
SEED = 0  # every forward starts from this seed, so dropout draws the same masks in both libraries
FP32 = dict(atol=1e-5, rtol=1e-5)
# Half-precision tolerances. lorakit and PEFT round at different points (lorakit scales the rank-r
# hidden and casts the LoRA term to the base dtype before adding it; PEFT adds in float32, then
# casts), so each adapted layer's output may differ by an ulp or two of the base dtype (bf16:
# 2^-8 relative, fp16: 2^-11), and that difference passes through 2 layers and the LM head.
# Seen: up to 0.004 (bf16) and 0.0005 (fp16) on logits of about 0.4; PEFT itself is 0.005 (bf16)
# from the float32 model.
BF16 = dict(atol=1e-2, rtol=1e-2)
FP16 = dict(atol=2e-3, rtol=2e-3)


@dataclasses.dataclass(frozen=True)
class Feature:
    first: dict  # LoraConfig kwargs of adapter "first" ("second" is always SECOND)
    active: tuple[str, ...]
    mixed: bool = False  # run mixed batches: adapter_names=mixed_names(batch)
    train: bool = False  # lora_dropout only acts in train mode


FEATURES = {
    "one_adapter": Feature(FIRST, ("first",)),
    "two_active": Feature(FIRST, ("first", "second")),
    "dropout": Feature({**FIRST, "lora_dropout": 0.25}, ("first",), train=True),
    "dora": Feature({**FIRST, "use_dora": True}, ("first",)),
    # both adapters active so both train; PEFT refuses DoRA in mixed batches, so plain LoRA here
    "mixed_batch": Feature(FIRST, ("first", "second"), mixed=True),
}


def mixed_names(batch: int, shift: int = 0) -> list[str]:
    """One adapter name per sample: interleaved, so the samples of an adapter are not one block."""
    cycle = itertools.islice(itertools.cycle(["first", "__base__", "second", "first"]), shift, None)
    return list(itertools.islice(cycle, batch))


def wrapped(lib, feature: str, base: torch.nn.Module | None = None):
    """`lib`'s model of `feature`: adapters "first" and "second" on the tiny Llama, the feature's
    active set, in train mode for dropout and eval mode otherwise."""
    spec = FEATURES[feature]
    model = lib.get_peft_model(
        base if base is not None else base_model("llama"),
        lora_config(lib, "CAUSAL_LM", **spec.first),
        adapter_name="first",
    )
    model.add_adapter("second", lora_config(lib, "CAUSAL_LM", **SECOND))
    model.base_model.set_adapter(list(spec.active))
    return model.train(spec.train)


@functools.cache
def _peft_model(feature: str, dtype: torch.dtype):
    return wrapped(peft, feature, base_model("llama").to(dtype))  # built once: PEFT builds slowly


def twins(feature: str, dtype: torch.dtype = torch.float32):
    """(lorakit model, PEFT model) of `feature` with the same base and (random) adapter weights,
    the same on every call: a fresh lorakit model, and a copy of PEFT's loaded with its weights."""
    base = base_model("llama").to(dtype)
    torch.manual_seed(0)  # the adapters' initialisation draws from the global generator
    lk = wrapped(lorakit, feature, base)
    perturb_adapters(lk, seed=7, scale=ADAPTER_NOISE)
    pf = copy.deepcopy(_peft_model(feature, dtype))
    pf.load_state_dict(lk.state_dict())
    return lk, pf


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, feature: str, shift: int = 0, **inputs) -> torch.Tensor:
    """The logits of `model` on `inputs`, with the feature's adapter names, from the dropout seed."""
    if FEATURES[feature].mixed:
        batch = next(iter(inputs.values())).shape[0]
        inputs["adapter_names"] = mixed_names(batch, shift)
    torch.manual_seed(SEED)
    return model(**inputs).logits


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    """A scalar of every logit (the mean of squares, 0 for an empty batch)."""
    return logits.float().square().sum() / max(logits.numel(), 1)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(pf, feature: str, backward: bool = True, **inputs):
    """PEFT's logits (detached) and, with `backward`, its parameter gradients of `loss_of`."""
    pf.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        logits = run(pf, feature, **inputs)
    if backward and logits.requires_grad:
        loss_of(logits).backward()
    return logits.detach(), grads(pf)


def assert_close(got, expected, what: str, tol: dict = FP32) -> None:
    torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"{what}: {m}")


def assert_same_grads(got: dict, expected: dict, what: str, tol: dict = FP32, times: int = 1) -> None:
    assert got.keys() == expected.keys(), f"{what}: gradients of {sorted(got.keys() ^ expected.keys())}"
    for name, grad in expected.items():
        assert_close(got[name], grad * times, f"{what}: grad of {name}", tol)


def check(lk, pf, feature: str, tol: dict = FP32, around=contextlib.nullcontext, calls: int = 2, **inputs):
    """lorakit's logits and gradients equal PEFT's on `inputs`, every one of `calls` times, with
    both models run inside `around()` (autocast: the arithmetic under test)."""
    with around():
        expected, expected_grads = reference(pf, feature, **inputs)
    for call in range(calls):
        lk.zero_grad(set_to_none=True)
        with around():
            got = run(lk, feature, **inputs)
            assert got.requires_grad == (len(expected_grads) > 0), f"call {call}: requires_grad"
            if got.requires_grad:
                loss_of(got).backward()
        assert_close(got.detach(), expected, f"call {call}: logits", tol)
        assert_same_grads(grads(lk), expected_grads, f"call {call}", tol)


# ---- the contexts (columns); each takes a feature name ------------------------------------------


def inference(mode):
    """Forward under `mode` (inference_mode / no_grad) equals PEFT's."""

    def context(feature: str) -> None:
        lk, pf = twins(feature)
        inputs = {"input_ids": token_ids(4, 6)}
        expected, _ = reference(pf, feature, backward=False, **inputs)
        for call in range(2):
            with mode():
                got = run(lk, feature, **inputs)
            assert_close(got, expected, f"call {call}")

    return context


def generate_in_inference_mode(feature: str) -> None:
    """Greedy `generate` under inference_mode: PEFT's tokens and per-step scores."""
    lk, pf = twins(feature)
    prompts = token_ids(3, 4)
    kwargs = dict(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=3,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    if FEATURES[feature].mixed:
        kwargs["adapter_names"] = mixed_names(3)
    torch.manual_seed(SEED)
    with torch.no_grad():
        expected = pf.generate(**kwargs)
    for call in range(2):
        torch.manual_seed(SEED)
        with torch.inference_mode():
            got = lk.generate(**kwargs)
        assert torch.equal(got.sequences, expected.sequences), f"call {call}: tokens"
        for step, (score, want) in enumerate(zip(got.scores, expected.scores, strict=True)):
            assert_close(score, want, f"call {call}: scores of step {step}")


THREAD_JOBS = [  # (batch, length, grad mode) per thread: other shapes, names and modes at once
    (1, 3, torch.no_grad),
    (2, 5, torch.inference_mode),
    (3, 4, torch.enable_grad),
    (4, 6, torch.no_grad),
]


def threads(feature: str) -> None:
    """Four threads run at once (other batch shapes, adapter names and grad modes), three calls
    each; every result equals PEFT's single-threaded one. Dropout runs in eval mode here: the
    threads share one random generator, so their masks depend on the interleaving."""
    lk, pf = twins(feature)
    lk.eval()
    pf.eval()
    inputs = [{"input_ids": token_ids(b, t, seed=k)} for k, (b, t, _) in enumerate(THREAD_JOBS)]
    with torch.no_grad():
        expected = [run(pf, feature, shift=k, **inputs[k]) for k in range(len(THREAD_JOBS))]
    barrier = threading.Barrier(len(THREAD_JOBS))
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            barrier.wait()
            with THREAD_JOBS[k][2]():
                results[k] = [lk(**inputs[k], **names(k)).logits.detach().clone() for _ in range(3)]
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)

    def names(k: int) -> dict:
        batch = THREAD_JOBS[k][0]
        return {"adapter_names": mixed_names(batch, shift=k)} if FEATURES[feature].mixed else {}

    workers = [threading.Thread(target=work, args=(k,)) for k in range(len(THREAD_JOBS))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    for k, outs in results.items():
        for call, got in enumerate(outs):
            assert_close(got, expected[k], f"thread {k}, call {call}")
    assert results.keys() == set(range(len(THREAD_JOBS)))


def compiled(feature: str) -> None:
    """torch.compile (dynamic shapes, aot_eager: dynamo and AOT autograd trace the fast paths; no
    code generation) equals eager PEFT across shapes, set_adapter, merge and unmerge, the same
    state change made on both models."""
    torch._dynamo.reset()
    lk, pf = twins(feature)
    spec = FEATURES[feature]
    model = torch.compile(lk, backend="aot_eager", dynamic=True)

    def set_active(names):
        return lambda m: m.base_model.set_adapter(list(names))

    steps = [
        ("shape (2, 5)", None, (2, 5)),
        ("shape (3, 7)", None, (3, 7)),
        ("set_adapter(second)", set_active(["second"]), (3, 7)),
        ("set_adapter back", set_active(spec.active), (2, 5)),
    ]
    if not spec.mixed:  # mixed batches refuse merged adapters (by design, see test_mixed_batch.py)
        steps += [
            ("merge_adapter", lambda m: m.merge_adapter(), (2, 5)),
            ("unmerge_adapter", lambda m: m.unmerge_adapter(), (3, 7)),
        ]
    for what, change, shape in steps:
        if change is not None:
            change(lk)
            change(pf)
        inputs = {"input_ids": token_ids(*shape)}
        expected, expected_grads = reference(pf, feature, **inputs)
        lk.zero_grad(set_to_none=True)
        got = run(model, feature, **inputs)
        if got.requires_grad:
            loss_of(got).backward()
        tol = FP32 if "merge" not in what else dict(atol=3e-5, rtol=3e-5)  # merged weights round once more
        assert_close(got.detach(), expected, what, tol)
        assert_same_grads(grads(lk), expected_grads, what)


def checkpointed(reentrant: bool):
    """Gradient checkpointing (transformers', train mode) gives the logits and gradients of a
    plain run. Reentrant checkpointing needs an input that requires grad, hence
    enable_input_require_grads (as PEFT's prepare_model_for_kbit_training does)."""

    def context(feature: str) -> None:
        lk, pf = twins(feature)
        lk.train()
        if reentrant:
            lk.enable_input_require_grads()
        lk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert lk.get_base_model().model.layers[0].gradient_checkpointing
        check(lk, pf, feature, input_ids=token_ids(4, 6))

    return context


def autocast_bf16(feature: str) -> None:
    """CPU bf16 autocast: PEFT's logits and gradients under the same autocast."""
    lk, pf = twins(feature)
    around = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    check(lk, pf, feature, BF16, around, input_ids=token_ids(4, 6))


def half_base(dtype: torch.dtype, tol: dict):
    """A half-precision base (adapters in float32, as PEFT keeps them): PEFT's logits and gradients
    with the same base."""

    def context(feature: str) -> None:
        lk, pf = twins(feature, dtype)
        check(lk, pf, feature, tol, input_ids=token_ids(4, 6))

    return context


def functional(feature: str) -> None:
    """`torch.func.functional_call` with other tensors for every parameter (base and adapters)
    computes with those, and its gradients reach them; the module's own weights are used again
    after (no hidden cached for the swapped weights is reused)."""
    lk, pf = twins(feature)
    inputs = {"input_ids": token_ids(4, 6)}
    check(lk, pf, feature, **inputs)  # also learns the sibling groups with the module's own weights
    own = reference(pf, feature, **inputs)
    swapped = {n: (p.detach() * 1.25).requires_grad_(p.requires_grad) for n, p in lk.named_parameters()}
    with torch.no_grad():
        for name, param in pf.named_parameters():
            param.copy_(swapped[name])
    expected, expected_grads = reference(pf, feature, **inputs)
    trainable = [n for n, t in swapped.items() if t.requires_grad]
    for call in range(2):
        if FEATURES[feature].mixed:
            inputs["adapter_names"] = mixed_names(4)
        torch.manual_seed(SEED)
        got = functional_call(lk, swapped, args=(), kwargs=inputs).logits
        found = torch.autograd.grad(loss_of(got), [swapped[n] for n in trainable], allow_unused=True)
        got_grads = {n: g for n, g in zip(trainable, found, strict=True) if g is not None}
        assert_close(got.detach(), expected, f"call {call}: logits")
        assert_same_grads(got_grads, expected_grads, f"call {call}")
        inputs.pop("adapter_names", None)
    lk.zero_grad(set_to_none=True)
    again = run(lk, feature, **inputs)
    loss_of(again).backward()
    assert_close(again.detach(), own[0], "own weights after functional_call")
    assert_same_grads(grads(lk), own[1], "own weights after functional_call")


def add_hooks(model) -> list[str]:
    """Hooks on adapted modules that change what they compute: q_proj's output (forward hook),
    v_proj's input (pre-hook), up_proj's base layer output; k_proj's hook only records."""
    calls: list[str] = []
    layers = model.get_base_model().model.layers
    attention = layers[0].self_attn
    attention.q_proj.register_forward_hook(lambda m, args, out: out * 1.5 + 0.25)
    attention.v_proj.register_forward_pre_hook(lambda m, args: (args[0] * 0.5, *args[1:]))
    attention.k_proj.register_forward_hook(lambda m, args, out: calls.append("k_proj"))
    layers[1].mlp.up_proj.base_layer.register_forward_hook(lambda m, args, out: out - 0.5)
    return calls


def hooked(feature: str) -> None:
    """Forward hooks and pre-hooks on adapted modules (and a base layer) are honoured: PEFT's
    logits and gradients with the same hooks, which do change them."""
    lk, pf = twins(feature)
    inputs = {"input_ids": token_ids(4, 6)}
    unhooked, _ = reference(pf, feature, backward=False, **inputs)
    ours, theirs = add_hooks(lk), add_hooks(pf)
    check(lk, pf, feature, **inputs)
    assert (len(ours), len(theirs)) == (2, 1)  # k_proj ran in each of lorakit's two calls, PEFT's one
    assert (reference(pf, feature, backward=False, **inputs)[0] - unhooked).abs().max() > 1e-2


def copied(make_copy):
    """A copy (made after the original learned its sibling groups) gives PEFT's logits and
    gradients, and so does the original after the copy ran."""

    def context(feature: str) -> None:
        lk, pf = twins(feature)
        inputs = {"input_ids": token_ids(4, 6)}
        check(lk, pf, feature, calls=1, **inputs)
        duplicate = make_copy(lk)
        check(duplicate, pf, feature, **inputs)
        check(lk, pf, feature, calls=1, **inputs)

    return context


def state_dict_round_trip(feature: str) -> None:
    """`load_state_dict(state_dict())` into a fresh wrapped model (other base and adapter weights)
    gives PEFT's logits and gradients."""
    lk, pf = twins(feature)
    other_base = base_model("llama")
    perturb_adapters(other_base, seed=3)  # every base tensor moves: the load must restore them all
    fresh = wrapped(lorakit, feature, other_base)
    fresh.load_state_dict(lk.state_dict())
    check(fresh, pf, feature, input_ids=token_ids(4, 6))


def shaped(batch: int, length: int):
    """Inputs of an edge shape (one sample, one token) give PEFT's results."""

    def context(feature: str) -> None:
        lk, pf = twins(feature)
        check(lk, pf, feature, input_ids=token_ids(batch, length))

    return context


def empty_batch(feature: str) -> None:
    """A batch of 0 samples through sibling adapted layers (q/k/v): PEFT's (empty) outputs and
    (zero) gradients. Layer-level: transformers' Llama itself cannot run an empty batch (its
    attention reshapes with -1)."""
    lk, pf = twins(feature)
    check_projections(lk, pf, feature, lambda: torch.randn(0, 6, 32).requires_grad_())


def non_contiguous(feature: str) -> None:
    """Non-contiguous inputs: inputs_embeds given as a transposed and as a strided view (gradients
    to the embeddings too), and sibling adapted layers (q/k/v) called on a transposed view."""
    lk, pf = twins(feature)
    views = {"transposed": lambda leaf: leaf.transpose(0, 1), "strided": lambda leaf: leaf[:, ::2]}
    shapes = {"transposed": (6, 3, 32), "strided": (3, 12, 32)}
    for kind, view in views.items():

        def once(model, kind=kind, view=view):
            model.zero_grad(set_to_none=True)
            leaf = torch.randn(shapes[kind], generator=torch.Generator().manual_seed(5)).requires_grad_()
            assert not view(leaf).is_contiguous()
            logits = run(model, feature, inputs_embeds=view(leaf))
            loss_of(logits).backward()
            return logits.detach(), {**grads(model), "inputs_embeds": leaf.grad}

        expected, expected_grads = once(pf)
        for call in range(2):
            got, got_grads = once(lk)
            assert_close(got, expected, f"{kind}, call {call}: logits")
            assert_same_grads(got_grads, expected_grads, f"{kind}, call {call}")
    transposed = lambda: torch.randn(6, 3, 32, generator=torch.Generator().manual_seed(6)).requires_grad_()  # noqa: E731
    check_projections(lk, pf, feature, transposed, lambda leaf: leaf.transpose(0, 1))


def projections(model, feature: str, x: torch.Tensor) -> torch.Tensor:
    """q_proj, k_proj and v_proj of the first block called on one input `x` (siblings, which
    lorakit groups from the second call), outputs concatenated; the feature's names if mixed."""
    attention = model.get_base_model().model.layers[0].self_attn
    layers = (attention.q_proj, attention.k_proj, attention.v_proj)
    names = mixed_names(x.shape[0]) if FEATURES[feature].mixed else None
    torch.manual_seed(SEED)
    if isinstance(model, peft.PeftModel):
        kwargs = {} if names is None else {"adapter_names": names}
        return torch.cat([layer(x, **kwargs) for layer in layers], dim=-1)
    with model.base_model.per_sample_adapters(names):
        return torch.cat([layer(x) for layer in layers], dim=-1)


def check_projections(lk, pf, feature: str, make_leaf, view=lambda leaf: leaf) -> None:
    """`projections` of lorakit on `view(make_leaf())` equal PEFT's, with the gradients of the
    adapters and of the leaf, on two calls."""

    def once(model):
        model.zero_grad(set_to_none=True)
        leaf = make_leaf()
        out = projections(model, feature, view(leaf))
        loss_of(out).backward()
        return out.detach(), {**grads(model), "x": leaf.grad}

    expected, expected_grads = once(pf)
    for call in range(2):
        got, got_grads = once(lk)
        assert_close(got, expected, f"q/k/v_proj, call {call}")
        assert_same_grads(got_grads, expected_grads, f"q/k/v_proj, call {call}")


def backward_twice(feature: str) -> None:
    """`backward(retain_graph=True)` then `backward()` on one graph accumulates twice PEFT's
    gradients: the saved (or rebuilt) inputs and hiddens survive the first backward."""
    lk, pf = twins(feature)
    inputs = {"input_ids": token_ids(4, 6)}
    expected, expected_grads = reference(pf, feature, **inputs)
    for call in range(2):
        lk.zero_grad(set_to_none=True)
        got = run(lk, feature, **inputs)
        loss = loss_of(got)
        loss.backward(retain_graph=True)
        loss.backward()
        assert_close(got.detach(), expected, f"call {call}: logits")
        assert_same_grads(grads(lk), expected_grads, f"call {call}", times=2)


def double_backward(feature: str) -> None:
    """A gradient penalty (`autograd.grad(..., create_graph=True)`, then backward through the
    gradients: second-order terms through A and B) gives PEFT's parameter gradients."""

    def penalised(model):
        model.get_base_model().config._attn_implementation = "eager"  # SDPA on CPU: no double backward
        model.zero_grad(set_to_none=True)
        params = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
        loss = loss_of(run(model, feature, input_ids=token_ids(3, 5)))
        first = torch.autograd.grad(loss, params, create_graph=True)
        (loss + sum(g.square().sum() for g in first)).backward()
        return grads(model)

    lk, pf = twins(feature)
    expected = penalised(pf)
    for call in range(2):
        assert_same_grads(penalised(lk), expected, f"call {call}", dict(atol=1e-5, rtol=1e-4))


CONTEXTS = {
    "inference_mode": inference(torch.inference_mode),
    "inference_mode_generate": generate_in_inference_mode,
    "no_grad": inference(torch.no_grad),
    "threads": threads,
    "compile": compiled,
    "checkpoint_reentrant": checkpointed(True),
    "checkpoint_non_reentrant": checkpointed(False),
    "autocast_bf16": autocast_bf16,
    "bf16_base": half_base(torch.bfloat16, BF16),
    "fp16_base": half_base(torch.float16, FP16),
    "functional_call": functional,
    "hooks": hooked,
    "deepcopy": copied(copy.deepcopy),
    "pickle": copied(lambda model: pickle.loads(pickle.dumps(model))),
    "state_dict": state_dict_round_trip,
    "batch_0": empty_batch,
    "batch_1": shaped(1, 6),
    "seq_len_1": shaped(3, 1),
    "non_contiguous": non_contiguous,
    "retain_graph": backward_twice,
    "double_backward": double_backward,
}

# torch.compile traces and recompiles the model per cell (about a minute each on 2 cores)
MARKS: dict[str, list] = {"compile": [pytest.mark.slow]}

CELLS = [
    pytest.param(context, feature, id=f"{context}-{feature}", marks=MARKS.get(context, []))
    for context in CONTEXTS
    for feature in FEATURES
]


@pytest.fixture(autouse=True)
def _single_thread():
    """The models are tiny: intra-op threads only add overhead (the threads context has its own)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize(("context", "feature"), CELLS)
def test_lorakit_matches_peft_in_every_context(context, feature):
    CONTEXTS[context](feature)


@pytest.mark.parametrize("feature", FEATURES)
def test_every_feature_changes_the_logits(feature):
    """Guards the matrix against vacuous comparisons: each feature's reference differs from the
    base model and from the one-adapter reference by far more than the tolerances."""
    _, pf = twins(feature)
    _, plain = twins("one_adapter")
    inputs = {"input_ids": token_ids(4, 6)}
    logits, _ = reference(pf, feature, backward=False, **inputs)
    with pf.disable_adapter():
        base, _ = reference(pf, feature, backward=False, **inputs)
    assert (logits - base).abs().max() > 0.1
    if feature != "one_adapter":
        assert (logits - reference(plain, "one_adapter", backward=False, **inputs)[0]).abs().max() > 0.05
