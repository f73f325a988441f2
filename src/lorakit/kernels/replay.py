"""Rebuilding an adapted layer's input in backward from tensors autograd keeps anyway.

`dA = (s B^T dY)^T x` needs the layer input x, which a frozen model's backward does not keep, so a
LoRA layer would save it: a full-size activation per adapted input. Often x is a product whose
factors the graph has saved already: the down projection's input in Llama's MLP, `act(gate) * up`,
or RMSNorm's output `weight * (h * rsqrt(mean(h^2) + eps))`. Then x is rebuilt in backward by the
same elementwise multiplications, in the same order, from those saved factors (the same values, bit
for bit) instead of being kept twice. Anything else (a view, a LayerNorm, a dtype cast, an input
modified in place, tracing under torch.compile) is not rebuilt: the layer saves x as before. Nor
under non-reentrant activation checkpointing: it lets each saved tensor be unpacked once, and the
factors are the multiplication's own saved tensors (x is recomputed there anyway).

Which factors a multiplication node keeps follows from autograd's rule for `a * b`: it saves `a`
when `b` needs a gradient and `b` when `a` does. A factor it did not save is rebuilt from the node
that produced it, when that node is again such a multiplication.
"""

from __future__ import annotations

import torch

_MAX_DEPTH = 3  # RMSNorm needs 2: weight * (h * rsqrt(...))


class InputReplay:
    """Rebuilds one tensor in backward; shared by every layer that read that tensor (q/k/v), which
    all get one rebuild: it is kept from the first layer's backward until the last one's."""

    def __init__(self, plan: tuple, shape: torch.Size) -> None:
        self._plan, self._shape = plan, shape
        self._users = 0
        self._value: torch.Tensor | None = None

    def add_user(self) -> None:
        """One more backward will call `take`."""
        self._users += 1

    def take(self) -> torch.Tensor:
        """The rebuilt tensor (shape as at forward); the last user's call releases the cache."""
        value = self._value if self._value is not None else _run(self._plan)
        if value.shape != self._shape:  # a wrong plan would be a bug here, not a user error
            raise RuntimeError(
                f"lorakit rebuilt a layer input of shape {tuple(value.shape)}, expected {tuple(self._shape)}"
            )
        self._users -= 1
        self._value = value if self._users > 0 else None
        return value


def replay_for(x: torch.Tensor) -> InputReplay | None:
    """The shared `InputReplay` of `x`, or None when x must be saved (see the module docstring)."""
    if torch.compiler.is_compiling() or x._version != 0 or not x.requires_grad or checkpointing():
        return None
    known = getattr(x, "_lorakit_replay", None)
    if known is not None:
        return known
    plan = _plan(x.grad_fn, 0)
    if plan is None:
        return None
    replay = InputReplay(plan, x.shape)
    try:
        x._lorakit_replay = replay  # the next layer reading x (k, v after q) finds it here
    except AttributeError:  # a tensor subclass without attributes: each layer rebuilds its own
        pass
    return replay


def checkpointing() -> bool:
    """Whether torch.utils.checkpoint's saved-tensor hooks are set (non-reentrant checkpointing, in
    its forward or in its recomputation)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return hooks is not None and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint"


def _plan(node, depth: int) -> tuple | None:
    """How to rebuild the output of `node`: ("mul", left, right), each side either ("saved", node,
    attribute) or a nested plan; None if it cannot be rebuilt."""
    if node is None or depth >= _MAX_DEPTH or node.name() != "MulBackward0":
        return None
    (left, left_nr), (right, right_nr) = node.next_functions
    # `self` is saved iff `other` needs a gradient (has a producer node), and the other way round
    left_plan = ("saved", node, "_saved_self") if right is not None else _child_plan(left, left_nr, depth)
    right_plan = ("saved", node, "_saved_other") if left is not None else _child_plan(right, right_nr, depth)
    if left_plan is None or right_plan is None:
        return None
    return ("mul", left_plan, right_plan)


def _child_plan(node, output_nr: int, depth: int) -> tuple | None:
    return _plan(node, depth + 1) if output_nr == 0 else None


def _run(plan: tuple) -> torch.Tensor:
    if plan[0] == "saved":
        return getattr(plan[1], plan[2])
    return torch.mul(_run(plan[1]), _run(plan[2]))
