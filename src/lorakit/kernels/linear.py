"""The fused LoRA / DoRA linear path: one autograd node per adapted linear layer and adapter.

`LoraLinearFunction` computes, for 2-D x (N, in):

    base = x W^T + b                      (W given: the base matmul is done here, in place)
         = result                         (W None: the base output was computed by the caller)
    lora = s * (B A drop(x) + b_B)
    out  = base + lora                    (LoRA)
    out  = f * (base - b + lora) + b      (DoRA, f = m / ||W + s B A|| per output column)

The scale multiplies the rank-r tensor, the LoRA add is the output matmul's `addmm` (in place on
the base output when the base matmul is ours), and backward keeps only: x (shared by every
adapter and layer reading the same x, and not kept at all when `replay.py` can rebuild it), the
rank-r hidden `s A drop(x)`, a one-byte 0/1 keep-mask with dropout (the dropped input is rebuilt in
backward), and for DoRA the output itself (the direction is `out / f`; an output changed in
place, as by `ReLU(inplace=True)`, or a second backward has the direction rebuilt from x), the
direction itself with a base bias, or the given base output. Double backward (`create_graph=True`)
rebuilds the hidden and the direction from the graph's own tensors, so second-order terms are the
plain ops'. The base input gradient and the LoRA one are summed in place (`addmm_`), not by a
separate add. The hidden may also come in ready-made from the layer's siblings (`grouped.py`).
Under torch.func transforms, autocast, or `use_fused_kernels(False)` the plain ops run instead.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import torch
from torch import nn

from .replay import InputReplay, replay_for

_DRAW_RANGE = 1 << 53  # dropout draws an integer below 2^53 per element (see _keep_mask)
# Off by default (PEFT's behaviour: one mask per layer). See `share_dropout_masks`.
_fused = {"enabled": True}
_shared_mask = {"enabled": False, "input": None, "version": -1, "p": -1.0, "keep": None}


def share_dropout_masks(enabled: bool = True) -> None:
    """Let adapted layers that read the same input tensor (q/k/v, gate/up) share one dropout mask.

    Off by default: PEFT, and lorakit by default, draw an independent mask per layer. Sharing draws
    one per input instead (fewer random numbers, about 40% fewer on a Llama block), so the layers'
    dropout noise becomes correlated and results differ from PEFT's for the same seed. Outputs and
    gradients still follow `W x + s B A (mask * x) / (1 - p)` with that mask.
    """
    _shared_mask.update(enabled=bool(enabled), input=None, keep=None)


def masks_shared() -> bool:
    """Whether `share_dropout_masks(True)` is in effect."""
    return _shared_mask["enabled"]


def drop_probability(dropout: nn.Module) -> float:
    """The probability `dropout` zeroes an element now: 0 for Identity or in eval mode."""
    if not dropout.training or isinstance(dropout, nn.Identity):
        return 0.0
    return float(getattr(dropout, "p", 0.0))


def use_fused_kernels(enabled: bool = True) -> None:
    """Turn lorakit's fused paths (this module, `grouped.py`, `replay.py`) on (the default) or off.

    Off, every adapted layer runs PEFT's plain ops: `lora_B(lora_A(dropout(x))) * scaling`. The
    fused paths give the same numbers; turn them off to run code that needs plain autograd ops all
    through, such as double backward through a layer whose lora_A is frozen.
    """
    _fused["enabled"] = bool(enabled)


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, jvp, ...) is running: the autograd
    Functions here define no vmap or jvp rule, so the plain ops run instead (PEFT's arithmetic)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def fusable(x: torch.Tensor, out_dtype: torch.dtype, weight_a: torch.Tensor) -> bool:
    """Whether the fused path takes these dtypes: all equal, or on CUDA a half-precision base with a
    float32 adapter, computed in the base dtype (the small factors are cast, outputs stay close).
    Under autocast the plain ops run instead, so autocast picks each op's dtype as it does for PEFT,
    and so they do under torch.func transforms (`functorch_active`)."""
    if not _fused["enabled"] or torch.is_autocast_enabled(x.device.type) or functorch_active():
        return False
    if out_dtype == x.dtype == weight_a.dtype:
        return True
    return x.is_cuda and out_dtype == x.dtype and x.dtype in (torch.float16, torch.bfloat16)


def fused_linear(
    result: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor | None,
    factor: torch.Tensor | None,
    scaling: float,
    p: float,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `LoraLinearFunction` on (..., features) tensors (see the module docstring).

    Args:
        result: base output (..., out), or None to compute it here from `weight`.
        x: (..., in). weight: base weight (out, in) (a transposed view for fan_in_fan_out) or None.
        bias: base bias (out,) or None. weight_a: (r, in). weight_b: (out, r). bias_b: (out,) or None.
        factor: DoRA's (out,) `m / ||W + s B A||` (norm detached), or None for LoRA.
        p: dropout probability on the adapter input (0: none).
        hidden: (N, r) `s A drop(x)` already computed with the layer's siblings (`grouped.py`), or
            None; when given, `weight_a` is None and `p` is 0.
    """
    lead = x.shape[:-1]
    keep = shared_keep(x, p) if p > 0 and _shared_mask["enabled"] else None
    flat_result = None if result is None else result.reshape(-1, result.shape[-1])
    flat_x = x.reshape(-1, x.shape[-1])
    args = (flat_result, flat_x, weight, bias, weight_a, weight_b, bias_b, factor, scaling, p, keep, hidden)
    if torch.is_grad_enabled():
        out = LoraLinearFunction.apply(*args, replay_for(x))
    else:  # inference: the same arithmetic without an autograd node
        out = _forward(*args)[0]
    return out.view(*lead, out.shape[-1])


def _forward(result, x, weight, bias, weight_a, weight_b, bias_b, factor, scaling, p, given_keep, given):
    compute = x.dtype
    b = weight_b.to(compute)
    keep = None
    if given is not None:
        hidden = given
    else:
        if p > 0:  # drop(x) = (x * keep) / (1 - p): the 1 / (1 - p) goes onto the rank-r tensor
            keep = given_keep if given_keep is not None else _keep_mask(x, p)
        hidden = _hidden(x, weight_a.to(compute), keep, scaling, p)
    dora = factor is not None
    if weight is None:
        out = torch.addmm(result, hidden, b.t())
    else:
        use_bias = bias is not None and not dora  # DoRA adds the bias after the factor
        out = torch.addmm(bias, x, weight.t()) if use_bias else torch.mm(x, weight.t())
        out.addmm_(hidden, b.t())
    if bias_b is not None:
        out.add_(bias_b.to(compute), alpha=scaling)
    direction = recover = None
    if dora:
        f = factor.to(compute)
        direction = out.sub_(bias) if (weight is None and bias is not None) else out
        out = direction * f if bias is None else torch.addcmul(bias, direction, f)
        # with our own base matmul and no base bias the direction is out / f (to rounding) unless
        # some f is 0, so backward may take it from the output rather than keep it
        recover = (
            weight is not None
            and bias is None
            and not torch.compiler.is_compiling()
            and not bool((f == 0).any())
        )
    return out, keep, hidden, direction, recover


def _hidden(x, a, keep, scaling, p):
    """`s A drop(x)`: (N, r) from x (N, in), A (r, in) and the 0/1 keep-mask (N, in) or None."""
    if keep is None:
        return torch.mm(x, a.t()).mul_(scaling)
    return torch.mm(x * keep, a.t()).mul_(scaling / (1.0 - p))


def _direction(x, weight, bias, result, hidden, b, bias_b, scaling):
    """DoRA's direction `W x + s (B A drop(x) + b_B)` (N, out) rebuilt in backward: from x and W, or
    from the given base output (which holds the base bias)."""
    base = torch.mm(x, weight.t()) if weight is not None else (result if bias is None else result - bias)
    direction = torch.addmm(base, hidden, b.t())
    return direction if bias_b is None else direction.add(bias_b.to(direction.dtype), alpha=scaling)


class Inputs(NamedTuple):
    """`LoraLinearFunction`'s inputs by name, in `forward`'s order: read `ctx.needs_input_grad`
    through it, and build backward's gradients with it."""

    result: Any
    x: Any
    weight: Any
    bias: Any
    weight_a: Any
    weight_b: Any
    bias_b: Any
    factor: Any
    scaling: Any
    p: Any
    keep: Any
    given: Any
    replay: Any


class LoraLinearFunction(torch.autograd.Function):
    """See the module docstring. Shapes: result (N, out) or None, x (N, in), weight (out, in) or
    None, bias / bias_b / factor (out,) or None, weight_a (r, in) or None, weight_b (out, r),
    keep (N, in) 0/1 uint8 or None, given (N, r) or None. The dropout mask is drawn as
    `torch.nn.functional.dropout` draws it, so a fixed seed drops the same elements as PEFT's
    `nn.Dropout`; a given `keep` is a mask already drawn for this input (`share_dropout_masks`).
    `given` is the hidden `s A drop(x)` computed by the layer's group (`grouped.py`): then A is not
    an input here and the hidden's gradient is returned instead. x is kept for backward only when
    the gradient of A or W needs it, and not at all when `replay` can rebuild it (`replay.py`)."""

    @staticmethod
    def forward(
        ctx, result, x, weight, bias, weight_a, weight_b, bias_b, factor, scaling, p, keep, given, replay
    ):
        out, keep, hidden, direction, recover = _forward(
            result, x, weight, bias, weight_a, weight_b, bias_b, factor, scaling, p, keep, given
        )
        ctx.scaling, ctx.p = scaling, p
        ctx.has = (result is not None, bias is not None, bias_b is not None)
        # DoRA takes its direction from the output unless that was changed in place (ReLU(inplace=True)
        # on it): a detached alias shares its version counter, and as a plain attribute (not saved)
        # it is no autograd check's concern; backward drops it
        ctx.output = (out.detach(), out._version) if recover else None
        # a grouped DoRA layer keeps x too (double backward rebuilds its direction W x + s B h on the
        # graph); the group holds the same x for A's gradient, so it costs no memory
        need = Inputs(*ctx.needs_input_grad)
        needs_x = need.weight or need.weight_a or bool(recover)
        needs_x = needs_x or (factor is not None and given is not None)
        ctx.replay, ctx.in_features = _input_source(replay, needs_x), x.shape[-1]
        saved_x = x if ctx.replay is None and needs_x else None
        # with a given base output DoRA keeps it (it holds W x + b) and rebuilds the direction
        saved_direction = result if factor is not None and result is not None else None
        if factor is not None and result is None and not recover:
            saved_direction = direction
        ctx.save_for_backward(
            saved_x, weight, bias, keep, weight_a, weight_b, bias_b, hidden, factor, saved_direction
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, keep, weight_a, weight_b, bias_b, hidden, factor, saved = ctx.saved_tensors
        if ctx.replay is not None:
            x = ctx.replay.take().reshape(-1, ctx.in_features)
        need = Inputs(*ctx.needs_input_grad)
        has_result, has_bias, has_bias_b = ctx.has
        kept = ctx.output
        if kept is not None:
            ctx.output = ()  # released: a retained graph's next backward rebuilds the direction from x
        # grad mode is on here only for `create_graph=True` (double backward): then every tensor the
        # gradients are built from must be on the graph, and the hidden computed in forward is not
        second_order = torch.is_grad_enabled()
        a = None if weight_a is None else weight_a.to(grad_out.dtype)
        b = weight_b.to(grad_out.dtype)
        if second_order and a is not None:
            hidden = _hidden(_need_input(x), a, keep, ctx.scaling, ctx.p)
        grad = grad_out
        grad_factor = grad_bias = None
        if factor is not None:
            f = factor.to(grad.dtype)
            if need.factor:
                direction, from_output = _dora_direction(
                    ctx, kept, x, weight, bias, saved, hidden, b, bias_b, second_order
                )
                moment = (grad * direction).sum(0)
                grad_factor = (moment / f if from_output else moment).to(factor.dtype)
            if need.bias and has_bias:  # with a given result, the bias also reaches it through `result`
                grad_bias = grad.sum(0) * (1 - f) if has_result else grad.sum(0)
            grad = grad * f
        elif need.bias and has_bias and not has_result:
            grad_bias = grad.sum(0)
        grad_weight = grad.t().mm(x) if need.weight else None
        # dB^T = H^T dY: MKL runs this (r, out) orientation faster than dY^T H (benchmarks/README.md)
        grad_b = hidden.t().mm(grad).t().to(weight_b.dtype) if need.weight_b else None
        grad_bias_b = (grad.sum(0) * ctx.scaling).to(weight_b.dtype) if need.bias_b and has_bias_b else None
        grad_given = grad_a = grad_x = None
        if a is None:  # the hidden came from the group, which takes its gradient from here on
            grad_given = grad.mm(b) if need.given else None
            if need.x and weight is not None:
                grad_x = grad.mm(weight)
        elif need.x or need.weight_a:
            # the gradient of `x * keep` (masked input) A^T, dropout's 1 / (1 - p) included
            grad_hidden = grad.mm(b).mul_(ctx.scaling / (1.0 - ctx.p))
            if need.weight_a:
                grad_a = grad_hidden.t().mm(x if keep is None else x * keep).to(weight_a.dtype)
            if need.x:
                grad_x = _input_grad(grad, weight, grad_hidden, a, keep)
        grad_result = grad if has_result else None
        grads = Inputs(
            result=grad_result,
            x=grad_x,
            weight=grad_weight,
            bias=grad_bias,
            weight_a=grad_a,
            weight_b=grad_b,
            bias_b=grad_bias_b,
            factor=grad_factor,
            scaling=None,
            p=None,
            keep=None,
            given=grad_given,
            replay=None,
        )
        return tuple(grads)


def _need_input(x: torch.Tensor | None) -> torch.Tensor:
    if x is None:
        raise RuntimeError(
            "lorakit's fused LoRA path cannot differentiate twice through a layer whose lora_A is "
            "frozen (its input was not kept); call `lorakit.kernels.use_fused_kernels(False)` before "
            "the forward to run PEFT's plain ops, which support create_graph=True"
        )
    return x


def _dora_direction(ctx, kept, x, weight, bias, saved, hidden, b, bias_b, second_order):
    """DoRA's direction (N, out) for the magnitude's gradient, and whether it is the output itself
    (`out = f * direction`, so the caller divides by f): the kept output (`ctx.output` as forward
    left it) while it is unchanged,
    else rebuilt (always for double backward, whose terms must run through the graph)."""
    if kept and not second_order and kept[0]._version == kept[1]:
        return kept[0], True
    if ctx.has[0]:  # `saved` is the given base output
        return _direction(None, None, bias, saved, hidden, b, bias_b, ctx.scaling), False
    if kept is None and not second_order:
        return saved, False
    return _direction(_need_input(x), weight, None, None, hidden, b, bias_b, ctx.scaling), False


def _input_source(replay: InputReplay | None, needs_x: bool) -> InputReplay | None:
    """`replay` if backward will need x and can rebuild it; registers the use."""
    if replay is None or not needs_x:
        return None
    replay.add_user()
    return replay


def _input_grad(grad, weight, grad_hidden, a, keep):
    """`grad W + keep * (grad_hidden A)`, summed in place into one new tensor."""
    if keep is not None:
        lora = grad_hidden.mm(a)
        return lora.mul_(keep) if weight is None else grad.mm(weight).addcmul_(lora, keep)
    if weight is None:
        return grad_hidden.mm(a)
    return grad.mm(weight).addmm_(grad_hidden, a)


def same_tensor(ref: weakref.ref | None, version: int, x: torch.Tensor) -> bool:
    """Whether `ref` still points at `x` itself (a weak reference: a freed tensor's address is never
    matched) and x is unmodified since `version` was read."""
    return ref is not None and ref() is x and x._version == version


def shared_keep(x: torch.Tensor, p: float) -> torch.Tensor:
    """The (N, in) keep-mask of the last layer that read this very tensor (same object, unmodified,
    same p), or a new one, drawn on x itself: as `F.dropout(x, p)` draws it, whatever x's layout."""
    state = _shared_mask
    if not same_tensor(state["input"], state["version"], x) or state["p"] != p:
        keep = _keep_mask(x, p).reshape(-1, x.shape[-1])
        state.update(input=weakref.ref(x), version=x._version, p=p, keep=keep)
    return state["keep"]


def dropout_fusable(x: torch.Tensor, p: float) -> bool:
    """Whether the fused path drops the elements `F.dropout(x, p)` drops for the same seed: it draws
    the mask of the (N, in) flattened x (`_keep_mask`), a view of x or a contiguous copy of it.

    Always for p = 0, a contiguous x, or shared masks (drawn on x itself, `shared_keep`). Otherwise
    on CPU when both fill their mask in the same order. `F.dropout` fills `empty_like(x)` in memory
    order: x's own strides when x is dense, else dense strides in x's stride order (contiguous for a
    strided slice). So a transposed 2-D x, a permuted x that flattens to a view, and a slice or an
    expanded tensor are drawn alike; a permuted x whose flattening copies (batch and sequence
    swapped, a 4-D permute) is not. Never on other devices (the CUDA kernel's order depends on the
    layout, unverified here) nor under torch.compile. Where this is False the caller takes the plain
    path, which calls the dropout module as PEFT does. Costs about 10-30 us, for non-contiguous x only.
    """
    if p == 0 or x.is_contiguous() or _shared_mask["enabled"]:
        return True
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        return False
    theirs = torch.empty_like(x, dtype=torch.uint8)  # the layout F.dropout fills (not filled here)
    if theirs.is_contiguous():  # drawn in logical order, as a contiguous copy or a row-major view is
        return True
    if not (_flattens_to_view(x) and _flattens_to_view(theirs)):  # a copy is drawn in logical order
        return False
    ours = torch.empty_like(x.view(-1, x.shape[-1]), dtype=torch.uint8)  # the layout `_keep_mask` fills
    flat_theirs = theirs.view(ours.shape)
    return all(
        a == b for a, b, n in zip(ours.stride(), flat_theirs.stride(), ours.shape, strict=True) if n > 1
    )


def _flattens_to_view(x: torch.Tensor) -> bool:
    """Whether `x.reshape(-1, x.shape[-1])` is a view: its leading dims merge into one."""
    dims = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1], strict=True) if size != 1]
    return all(outer == size * stride for (_, outer), (size, stride) in zip(dims, dims[1:]))


def _keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The 0/1 mask (uint8: arithmetic with it runs faster than with bool on CPU) of the
    elements dropout keeps: the same draw as `F.dropout(x, p)`, for any layout of x.

    On CPU that is `empty_like(x).bernoulli_(1 - p)`: per element, in the memory order of
    `empty_like(x)` (x's strides when x is dense, else dense ones in x's stride order), 64 random
    bits `v` from the global generator, `u = (v mod 2^53) * 2^-53`, kept when `u < 1 - p`.
    `randint(0, 2^53)` draws the same `v mod 2^53` (the generator advances alike), and `u < 1 - p`
    is `v mod 2^53 < ceil((1 - p) * 2^53)` exactly (scaling by a power of two is exact). That skips
    the float conversion, so it runs faster than `bernoulli_` or `torch.rand(float64)`; a
    non-contiguous x has its integers drawn into `empty_like(x)`, in the same order. Elsewhere the
    device's own dropout mask."""
    if x.device.type != "cpu":
        return torch.native_dropout(x, p, True)[1].view(torch.uint8)
    threshold = math.ceil((1.0 - p) * _DRAW_RANGE)
    if x.is_contiguous():
        draws = torch.randint(0, _DRAW_RANGE, x.shape, device=x.device)
    else:
        draws = torch.empty_like(x, dtype=torch.int64).random_(0, _DRAW_RANGE)
    return torch.lt(draws, threshold).view(torch.uint8)
