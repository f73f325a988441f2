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

The factors are taken from those nodes when the layer runs its forward, not in backward: another
backward may free the producer's graph first (two losses sharing a norm output, a second forward
reading x after a backward), and the layer must still get x, as it would had it saved x. Holding
them costs nothing while the producer keeps them too, and the rebuild drops them at its last
user's backward, which runs before the producer's (a later backward of a retained graph reads them
from the nodes again). A factor changed in place after the layer's forward is an error in
backward, as autograd's own check would make it. Under saved-tensor hooks (e.g. `save_on_cpu`)
taking a factor would run the hook's unpack, a copy held until backward: there the factors are
read from the nodes in backward, and a graph freed first cannot be rebuilt from.
"""

from __future__ import annotations

import weakref

import torch

_MAX_DEPTH = 3  # RMSNorm needs 2: weight * (h * rsqrt(...))


class InputReplay:
    """Rebuilds one tensor in backward; shared by every layer that read that tensor (q/k/v), which
    all get one rebuild: it is kept from the first layer's backward until the last one's, which
    also drops the factors taken at forward."""

    def __init__(self, plan: tuple, factors: tuple, shape: torch.Size) -> None:
        self._plan, self._factors, self._shape = plan, factors, shape
        self._users = 0
        self._value: torch.Tensor | None = None
        self._released = False

    def usable(self) -> bool:
        """Whether one more layer may use this rebuild: not once its last user has taken it."""
        return not self._released

    def add_user(self) -> None:
        """One more backward will call `take`."""
        self._users += 1

    def take(self) -> torch.Tensor:
        """The rebuilt tensor (shape as at forward); the last user's call releases the cache and the
        factors (a retained graph's next backward reads them from the nodes)."""
        value = self._value if self._value is not None else _run(self._factors)
        if value.shape != self._shape:  # a wrong plan would be a bug here, not a user error
            raise RuntimeError(
                f"lorakit rebuilt a layer input of shape {tuple(value.shape)}, expected {tuple(self._shape)}"
            )
        self._users -= 1
        self._value = value if self._users > 0 else None
        if self._users <= 0:
            self._factors, self._released = self._plan, True
        return value


def replay_for(x: torch.Tensor) -> InputReplay | None:
    """The shared `InputReplay` of `x`, or None when x must be saved (see the module docstring)."""
    if torch.compiler.is_compiling() or x._version != 0 or not x.requires_grad or checkpointing():
        return None
    known = getattr(x, "_lorakit_replay", None)
    known = known() if known is not None else None
    if known is not None and known.usable():
        return known
    plan = _plan(x.grad_fn, 0)
    factors = plan if plan is None or _saved_tensor_hooks() is not None else _taken(plan)
    if factors is None:
        return None
    replay = InputReplay(plan, factors, x.shape)
    try:  # the next layer reading x (k, v after q) finds it while a layer's backward holds it
        x._lorakit_replay = weakref.ref(replay)
    except AttributeError:  # a tensor subclass without attributes: each layer rebuilds its own
        pass
    return replay


def _saved_tensor_hooks() -> tuple | None:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def checkpointing() -> bool:
    """Whether torch.utils.checkpoint's saved-tensor hooks are set (non-reentrant checkpointing, in
    its forward or in its recomputation)."""
    hooks = _saved_tensor_hooks()
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


def _taken(plan: tuple) -> tuple | None:
    """`plan` with each saved factor taken now: ("tensor", factor, its version); None when autograd
    no longer has one (freed by a backward, or changed in place since the multiplication)."""
    if plan[0] == "mul":
        left, right = _taken(plan[1]), _taken(plan[2])
        return None if left is None or right is None else ("mul", left, right)
    try:
        tensor = getattr(plan[1], plan[2])
    except RuntimeError:
        return None
    return ("tensor", tensor, tensor._version)


def _run(plan: tuple) -> torch.Tensor:
    kind, first, second = plan
    if kind == "saved":
        return getattr(first, second)
    if kind == "tensor":
        if first._version != second:
            raise RuntimeError(
                f"a tensor of shape {tuple(first.shape)} that lorakit rebuilds an adapted layer's input "
                f"from was modified in place after that layer's forward (version {second} -> "
                f"{first._version}), so backward cannot use it; modify a clone instead (`.clone()`)."
            )
        return first
    return torch.mul(_run(first), _run(second))
