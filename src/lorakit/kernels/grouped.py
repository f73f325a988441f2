"""Sibling layers: one A-projection matmul for the adapted layers that read the same input.

q/k/v (and gate/up) each project the same x by their own A: three thin rank-r matmuls in forward
and six in backward. Stacking the A's of the group, `[A_q; A_k; A_v]` of shape (sum r, in), makes
each of these one matmul (`H = x A^T`, `dA = G^T x`, `dx = G A`), which runs faster than the thin
ones (and on a GPU is one launch instead of three).

Which layers are siblings is learned at run time: layers called one after another on the very same
tensor (same object, unmodified) form a group. From then on the first member to read a new input
computes the scaled rank-r hiddens `s_i A_i x` of every member in one autograd node
(`GroupedProjection`) and leaves the others theirs; each member's own node (`LoraLinearFunction`)
takes its hidden as an input. If any member cannot take part this call (merged, disabled, a mixed
batch, independent dropout masks, autocast, another dtype), nobody is grouped and each layer runs
alone, as it would without groups. A group whose hiddens are left unused (its members no longer
read one input) is forgotten and learned again. Not used while torch.compile traces, nor under
non-reentrant activation checkpointing, which re-runs the forward in backward and requires it to
save the same tensors as the first time (a group learned in between would change that).

Dropout: grouped members share one mask per input, so groups form under dropout only with
`share_dropout_masks(True)`; by default (independent masks, as PEFT) layers with dropout run alone.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from .linear import masks_shared, same_tensor, shared_keep
from .replay import InputReplay, checkpointing, replay_for


class _Seen(threading.local):
    """Per-thread run-time state: the input the last fused layers read, and hiddens left for members."""

    def __init__(self) -> None:
        self.learn_input: weakref.ref | None = None
        self.learn_version = -1
        self.learn_layers: list[weakref.ref] = []
        self.pending_input: weakref.ref | None = None
        self.pending_version = -1
        self.pending_mode: tuple[bool, bool] = (False, False)  # grad mode, inference mode
        # id(layer) -> (weak reference to the layer, its hidden for the pending input, the stamp of
        # what the hidden was computed from (`_stamp`), its A: held so that id(A) stays unique)
        self.pending: dict[int, tuple[weakref.ref, torch.Tensor, tuple, torch.Tensor]] = {}


_seen = _Seen()
# layer -> its group (weak references to every member, itself included, in call order)
_groups: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, ...]] = weakref.WeakKeyDictionary()


def sibling_hidden(
    layer: nn.Module, x: torch.Tensor, spec: tuple[torch.Tensor, float, float]
) -> torch.Tensor | None:
    """`layer`'s hidden `s A x` (N, r) computed together with its siblings', or None: run alone.

    A hidden left by a sibling is used only if it was computed from this very `x` (unmodified), in
    the same grad and inference mode, from the same A (same tensor, version, dtype, device and
    requires_grad), scaling and dropout p as `spec` says now; else the layer runs alone.

    Args:
        layer: an adapted linear layer whose `_group_spec(x)` returns `(weight_a, scaling, dropout_p)`
            of its first active adapter, or None when it cannot be grouped now.
        x: the layer input, (..., in_features). An inference tensor (no version counter, so an
            in-place change could not be seen) is never grouped.
        spec: `layer._group_spec(x)`, which the caller has just computed (not None).
    """
    if torch.compiler.is_compiling() or x.is_inference() or checkpointing():
        return None
    seen = _seen
    if seen.pending and same_tensor(seen.pending_input, seen.pending_version, x):
        left = seen.pending.pop(id(layer), None)
        if left is not None:
            if seen.pending_mode == _mode() and left[2] == _stamp(spec):
                return left[1]
            return None
    if seen.pending:  # hiddens computed for another input went unused: not siblings after all
        for ref, *_ in seen.pending.values():
            _forget(ref())
        seen.pending = {}
    group = _groups.get(layer)
    if group is None:
        _learn(layer, x)
        return None
    members = [ref() for ref in group]
    specs = [member._group_spec(x) if member is not None else None for member in members]
    if any(spec is None for spec in specs) or len({spec[2] for spec in specs}) > 1:
        return None
    p = specs[0][2]
    if p > 0 and not masks_shared():
        return None
    keep = shared_keep(x, p) if p > 0 else None
    hiddens = grouped_projection(x, [spec[0] for spec in specs], [spec[1] for spec in specs], p, keep)
    seen.pending_input, seen.pending_version, seen.pending_mode = weakref.ref(x), x._version, _mode()
    seen.pending = {
        id(member): (weakref.ref(member), hidden, _stamp(member_spec), member_spec[0])
        for member, hidden, member_spec in zip(members, hiddens, specs, strict=True)
        if member is not layer
    }
    return hiddens[members.index(layer)]


def _mode() -> tuple[bool, bool]:
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def _stamp(spec: tuple[torch.Tensor, float, float]) -> tuple:
    """What a member's hidden depends on besides x: its A (identity and state), scaling and p."""
    a, scaling, p = spec
    return id(a), a._version, a.dtype, a.device, a.requires_grad, scaling, p


def grouped_projection(
    x: torch.Tensor,
    weights_a: list[torch.Tensor],
    scalings: list[float],
    p: float,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """`s_i A_i drop(x)` for every i, by one matmul: tensors of shape (N, r_i), N = x.numel() / in.

    Args:
        x: (..., in). weights_a: (r_i, in) each. scalings: s_i each.
        p, keep: dropout probability and the (N, in) 0/1 uint8 keep-mask shared by the group (p = 0: None).
    """
    flat = x.reshape(-1, x.shape[-1])
    ranks = tuple(a.shape[0] for a in weights_a)
    scale = _scale(scalings, ranks, x) if len(set(scalings)) > 1 else scalings[0]
    scale = scale / (1.0 - p)
    if torch.is_grad_enabled():
        return GroupedProjection.apply(flat, scale, keep, replay_for(x), ranks, *weights_a)
    return _project(flat, scale, keep, ranks, weights_a)


def _project(x, scale, keep, ranks, weights_a):
    stacked = (
        torch.cat([a.to(x.dtype) for a in weights_a]) if len(weights_a) > 1 else weights_a[0].to(x.dtype)
    )
    hidden = torch.mm(x if keep is None else x * keep, stacked.t()).mul_(scale)
    return hidden.split(ranks, dim=1)


# forward's inputs before the members' A weights: x, scale, keep, replay, ranks
_FIXED_INPUTS = 5


class GroupedProjection(torch.autograd.Function):
    """`H = (x * keep) [A_1; ...; A_k]^T * scale`, returned split per member: inputs x (N, in),
    scale (a number or (sum r,) per column), keep (N, in) 0/1 uint8 or None, the `InputReplay` of x or
    None, the ranks, then each A_i (r_i, in). x is saved only when it cannot be rebuilt; the
    stacked A is rebuilt in backward, so what is kept is the hiddens: views of one (N, sum r)."""

    @staticmethod
    def forward(ctx, x, scale, keep, replay: InputReplay | None, ranks, *weights_a):
        ctx.set_materialize_grads(False)  # a hidden left unused (its layer not called) gets None
        hiddens = _project(x, scale, keep, ranks, weights_a)
        needs_x = any(ctx.needs_input_grad[_FIXED_INPUTS:])
        ctx.replay = replay if needs_x and replay is not None else None
        if ctx.replay is not None:
            ctx.replay.add_user()
        ctx.scale, ctx.ranks, ctx.in_features = scale, ranks, x.shape[-1]
        ctx.dtypes = [a.dtype for a in weights_a]
        saved_x = x if needs_x and ctx.replay is None else None
        ctx.save_for_backward(saved_x, keep, *weights_a)  # stacked again in backward: nothing new kept
        return hiddens

    @staticmethod
    def backward(ctx, *grads):
        x, keep, *weights_a = ctx.saved_tensors
        used = [g is not None for g in grads]
        if not any(used):
            return (None,) * (_FIXED_INPUTS + len(ctx.ranks))
        present = next(g for g in grads if g is not None)
        grads = [
            g if g is not None else present.new_zeros(present.shape[0], r) for g, r in zip(grads, ctx.ranks)
        ]
        grad = torch.cat(grads, dim=1) if len(grads) > 1 else grads[0]
        grad = grad * ctx.scale
        need = ctx.needs_input_grad  # (x, scale, keep, replay, ranks, *weights_a)
        grad_x = grad_as = None
        if need[0]:
            grad_x = grad.mm(torch.cat(weights_a).to(grad.dtype))
            if keep is not None:
                grad_x.mul_(keep)
        if any(need[_FIXED_INPUTS:]):
            if ctx.replay is not None:
                x = ctx.replay.take().reshape(-1, ctx.in_features)
            masked = x if keep is None else x * keep
            stacked_grad = grad.t().mm(masked)
            # a member whose layer was not called gets no gradient, as when run alone (not zeros)
            grad_as = [
                g.to(dtype) if member_used else None
                for g, dtype, member_used in zip(stacked_grad.split(ctx.ranks), ctx.dtypes, used, strict=True)
            ]
        return (grad_x, None, None, None, None, *(grad_as or [None] * len(ctx.ranks)))  # as forward's inputs


def _scale(scalings: list[float], ranks: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """Per-column scales (sum r,) when the members' scalings differ (rank_pattern / alpha_pattern)."""
    return torch.cat(
        [torch.full((r,), s, dtype=x.dtype, device=x.device) for r, s in zip(ranks, scalings, strict=True)]
    )


def _learn(layer: nn.Module, x: torch.Tensor) -> None:
    """Record that `layer` read `x`; layers reading one tensor in a row become a group."""
    seen = _seen
    if not same_tensor(seen.learn_input, seen.learn_version, x):
        seen.learn_input, seen.learn_version, seen.learn_layers = (
            weakref.ref(x),
            x._version,
            [weakref.ref(layer)],
        )
        return
    if any(ref() is layer for ref in seen.learn_layers):
        return
    seen.learn_layers.append(weakref.ref(layer))
    group = tuple(seen.learn_layers)
    for ref in group:
        member = ref()
        if member is not None:
            _groups[member] = group


def _forget(layer: nn.Module | None) -> None:
    """Drop the group `layer` belongs to, for every member."""
    group = _groups.pop(layer, ()) if layer is not None else ()
    for ref in group:
        member = ref()
        if member is not None:
            _groups.pop(member, None)


def forget_groups() -> None:
    """Forget every learned group and pending hidden (they are learned again on the next calls)."""
    _groups.clear()
    _seen.__init__()
