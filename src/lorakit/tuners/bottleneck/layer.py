"""Bottleneck adapters around a sublayer f: series `y + s g(y)` and parallel `f(x) + s g(x)`.

`g(h) = up(act(down(dropout(LN(h)))))`, with down (m, d_in) and up (d_out, m) projections with
biases (Houlsby et al., 2019, arXiv:1902.00751; He et al., 2022, arXiv:2110.04366). The layer
wraps the whole sublayer module, so it sees both the sublayer's input x and its output f(x).

A bottleneck adapter is non-linear in the sublayer's output: no weight change reproduces it, so
it cannot be merged (`merge` raises; `unload` removes it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...names import BOTTLENECK_PARAMETERS
from ..base import AdapterLayer
from .config import BottleneckConfig

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckLayer(AdapterLayer):
    """A sublayer `f` with bottleneck adapters by name.

    Per adapter (m = bottleneck size; d_in, d_out the sublayer's input and output sizes):
        adapter_down: Linear d -> m with bias, d = d_out in series mode, d_in in parallel mode.
        adapter_up: Linear m -> d_out with bias.
        adapter_layer_norm: LayerNorm(d) on the adapter's input (only with `layer_norm=True`).
        adapter_scale: trainable scalar s, shape (1,) (only with `scaling="learned"`).

    Forward: x (..., d_in) -> f(x) (..., d_out) plus the active adapters' outputs. Several active
    adapters are summed, each computed from the sublayer's own output (series) or input
    (parallel), as several LoRA adapters are: the result does not depend on their order. When f
    returns a tuple (some attention modules), the adapters act on its first element.
    """

    adapter_layer_names = BOTTLENECK_PARAMETERS
    other_param_names = ("mode", "scaling", "adapter_dropout", "adapter_act")

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_layer_norm = nn.ModuleDict()
        self.adapter_scale = nn.ParameterDict()
        self.adapter_dropout = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.mode: dict[str, str] = {}
        self.scaling: dict[str, float] = {}  # fixed scalings; learned ones live in adapter_scale

    def update_layer(self, adapter_name: str, config: BottleneckConfig, factory: dict) -> None:
        """Create adapter `adapter_name` (`factory`: device and dtype) and initialise it."""
        width = self.out_features if config.mode == "series" else self.in_features
        size = config.bottleneck_dim(self.out_features)
        self.mode[adapter_name] = config.mode
        self.adapter_down[adapter_name] = nn.Linear(width, size, **factory)
        self.adapter_up[adapter_name] = nn.Linear(size, self.out_features, **factory)
        if config.layer_norm:
            self.adapter_layer_norm[adapter_name] = nn.LayerNorm(width, **factory)
        if config.scaling == "learned":
            self.adapter_scale[adapter_name] = nn.Parameter(torch.ones(1, **factory))
        else:
            self.scaling[adapter_name] = float(config.scaling)
        self.adapter_act[adapter_name] = ACTIVATIONS[config.non_linearity]()
        p = float(config.dropout)
        self.adapter_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self._initialise(adapter_name, config.init_weights)

    def _initialise(self, adapter_name: str, init_weights: bool) -> None:
        """True: down Kaiming-uniform (a=sqrt(5)), up and biases zero (identity at step 0).
        False: up Kaiming-uniform too (the adapter changes the model from the start)."""
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        with torch.no_grad():
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.bias)
            if init_weights:
                nn.init.zeros_(up.weight)
            else:
                nn.init.kaiming_uniform_(up.weight, a=math.sqrt(5))

    def adapter_output(self, adapter_name: str, hidden: torch.Tensor) -> torch.Tensor:
        """`s * up(act(down(dropout(LN(hidden)))))`: (..., d) -> (..., d_out), in `hidden`'s dtype."""
        down = self.adapter_down[adapter_name]
        h = hidden.to(down.weight.dtype)
        if adapter_name in self.adapter_layer_norm:
            h = self.adapter_layer_norm[adapter_name](h)
        h = self.adapter_act[adapter_name](down(self.adapter_dropout[adapter_name](h)))
        out = self.adapter_up[adapter_name](h)
        scale = (
            self.adapter_scale[adapter_name]
            if adapter_name in self.adapter_scale
            else self.scaling[adapter_name]
        )
        return (out * scale).to(hidden.dtype)

    def forward(self, *args, **kwargs):
        active = [n for n in self._active_adapter if n in self.adapter_down]
        if self._disable_adapters or not active:
            return self.base_layer(*args, **kwargs)
        output = self.base_layer(*args, **kwargs)
        result = output[0] if isinstance(output, tuple) else output
        x = _sublayer_input(args, kwargs) if any(self.mode[n] == "parallel" for n in active) else None
        base_result = result
        for name in active:
            result = result + self.adapter_output(name, base_result if self.mode[name] == "series" else x)
        return (result, *output[1:]) if isinstance(output, tuple) else result

    def _check_merge_allowed(self, names: list[str]) -> None:
        if names:
            raise ValueError(
                f"Bottleneck adapter {names[0]!r} in {self.module_name!r} cannot be merged: its non-linearity "
                "makes it no change of weights. Keep the adapter model, or remove the adapter with unload() "
                "(or delete_adapter) to get the base model back."
            )

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError(f"Bottleneck adapter {adapter_name!r} has no weight change (it is non-linear).")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            # code written for the plain sublayer reads its attributes (e.g. T5 reads `wo.weight`)
            return getattr(self.base_layer, name)


def _sublayer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The sublayer's input x: its first positional argument, else `hidden_states=`."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise ValueError(
        "A parallel bottleneck adapter needs the sublayer's input, but it got no positional tensor and no "
        f"hidden_states= (keyword arguments: {sorted(kwargs)}); target a module called with its input first."
    )
