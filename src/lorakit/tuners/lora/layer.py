"""LoRA layers: `W x + scaling * B A dropout(x)` (Hu et al., 2021, arXiv:2106.09685).

Each class only says how to build one adapter, compute its weight change and run its forward;
everything else (active set, merge/unmerge, deletion) is `AdapterLayer`'s. Parameter names are
PEFT's (`lora_A.<adapter>.weight`, `lora_B`, `lora_embedding_A.<adapter>`, ...), because user code
picks parameters out of `named_parameters()` by these names.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from ... import kernels
from ...names import LORA_PARAMETERS
from ...targeting import TargetPlan
from ..base import AdapterLayer, group_positions, is_contiguous, per_sample, sample_adapters_of, sample_runs
from .config import LoraConfig, is_data_driven_init
from .dora import MagnitudeVector, dora_factor, row_norm


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (a linear layer whose weight is stored (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters of half-precision bases are kept in float32 (PEFT's autocast_adapter_dtype)."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class LoraLayer(AdapterLayer):
    """Per-adapter state common to every LoRA layer: rank, alpha, scaling and dropout by name."""

    supports_mixed_batches = True

    adapter_layer_names = LORA_PARAMETERS
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "_dora_merge_factor")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.use_dora: dict[str, bool] = {}
        self._dora_merge_factor: dict[str, torch.Tensor] = {}  # factor used at merge, to unmerge exactly

    def update_layer(self, adapter_name: str, plan: TargetPlan, config: LoraConfig) -> None:
        """Create adapter `adapter_name` with the planned rank/alpha and initialise it."""
        self.r[adapter_name] = plan.r
        self.lora_alpha[adapter_name] = plan.alpha
        self.scaling[adapter_name] = plan.scaling
        p = float(config.lora_dropout)
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self._create(adapter_name, plan.r, config, factory)
        if is_data_driven_init(config.init_lora_weights):
            self._initialise_from_weight(adapter_name, config)
        else:
            self._initialise(adapter_name, config.init_lora_weights)
        self.use_dora[adapter_name] = config.use_dora
        if config.use_dora:
            self._create_magnitude(adapter_name, factory)

    def _create_magnitude(self, adapter_name: str, factory: dict) -> None:
        """DoRA's magnitude starts at the row norms of `W + scaling B A`, so step 0 is the LoRA model."""
        rows = self._base_rows()
        magnitude = MagnitudeVector(self._magnitude_shape(rows), factory)
        with torch.no_grad():
            norm = row_norm(rows.float() + self._delta_rows(adapter_name).float())
            magnitude.weight.copy_(norm.view(magnitude.weight.shape))
        self.lora_magnitude_vector[adapter_name] = magnitude

    def _initialise_from_weight(self, adapter_name: str, config: LoraConfig) -> None:
        """PiSSA, OLoRA or LoftQ: factors computed from the base weight, which is replaced by the
        residual (or, for LoftQ, its quantized version) so that `W_new + scaling B A` is `W` (or
        LoftQ's approximation of it). The new weight is a new tensor: a base shared with other
        layers (layer_replication) is never changed under them."""
        from ... import init as lora_init
        from ...quant import loftq_init

        rows = self._base_rows()
        matrix = rows.reshape(rows.shape[0], -1)
        r, scaling, method = self.r[adapter_name], self.scaling[adapter_name], config.init_lora_weights
        if method == "olora":
            a, b, new = lora_init.olora_init(matrix, r, scaling)
        elif method == "loftq":
            loftq = config.loftq_config
            bits, iters = loftq.get("loftq_bits", 8), loftq.get("loftq_iter", 1)
            new, a, b = loftq_init(matrix, r, scaling, bits=bits, iters=iters)
        else:
            niter = int(method.rsplit("_", 1)[1]) if method.startswith("pissa_niter_") else None
            a, b, new = lora_init.pissa_init(matrix, r, scaling, niter=niter)
        self.set_factors(adapter_name, a, b)
        bias = self.lora_B[adapter_name].bias if adapter_name in self.lora_B else None
        if bias is not None:  # lora_bias starts at zero, as with the default init
            with torch.no_grad():
                bias.zero_()
        weight = self.base_layer.weight
        new_weight = self._rows_to_base(new.reshape(rows.shape)).to(weight.dtype).contiguous()
        self.base_layer.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)

    def set_factors(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Store 2-D factors A (r, fan_in) and B (rows, r) in this layer type's parameters."""
        with torch.no_grad():
            lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
            lora_a.copy_(a.reshape(lora_a.shape))
            lora_b.copy_(b.reshape(lora_b.shape))

    # ---- the weight in "rows" layout: one row per output (per DoRA magnitude) -----------------
    def _base_rows(self) -> torch.Tensor:
        """The base weight as (rows, ...): (out, in) for linear layers, (dim, num) for embeddings."""
        raise NotImplementedError

    def _rows_to_base(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of `_base_rows`'s layout change."""
        raise NotImplementedError

    def _delta_rows(self, adapter_name: str) -> torch.Tensor:
        """`scaling * B @ A` in rows layout, in the adapter's dtype."""
        raise NotImplementedError

    def _magnitude_shape(self, rows: torch.Tensor) -> tuple[int, ...]:
        return (rows.shape[0],)

    def _dora_factor(self, adapter_name: str) -> torch.Tensor:
        """(rows,) `magnitude / ||W + scaling B A||` for DoRA adapter `adapter_name`."""
        magnitude = self.lora_magnitude_vector[adapter_name].rows()
        return dora_factor(magnitude, self._base_rows(), self._delta_rows(adapter_name))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change merging `adapter_name` makes to the base weight, in the base layout.

        LoRA: `scaling * B A`. DoRA: `f * (W + scaling * B A) - W` with `f = m / ||W + scaling B A||`
        per row, taken at the current base weight.
        """
        delta = self._delta_rows(adapter_name)
        if self.use_dora.get(adapter_name):
            rows = self._base_rows()
            factor = self._dora_factor(adapter_name).detach()
            shape = (-1,) + (1,) * (rows.dim() - 1)
            delta = factor.view(shape).to(rows.dtype) * (rows + delta.to(rows.dtype)) - rows
        return self._rows_to_base(delta).to(self.base_layer.weight.dtype)

    def _merge_weight(self, adapter_name: str) -> None:
        if self.use_dora.get(adapter_name):  # unmerging needs the factor of the weight merged into
            self._dora_merge_factor[adapter_name] = self._dora_factor(adapter_name).detach()
        super()._merge_weight(adapter_name)

    def _unmerge_weight(self, adapter_name: str) -> None:
        if not self.use_dora.get(adapter_name):
            super()._unmerge_weight(adapter_name)
            return
        rows = self._base_rows()
        factor = self._dora_merge_factor.pop(adapter_name)
        shape = (-1,) + (1,) * (rows.dim() - 1)
        original = rows / factor.view(shape).to(rows.dtype) - self._delta_rows(adapter_name).to(rows.dtype)
        self.base_layer.weight.data.copy_(self._rows_to_base(original))

    def _check_merge_allowed(self, names: list[str]) -> None:
        together = list(self.merged_adapters) + list(names)
        dora = [n for n in together if self.use_dora.get(n)]
        if dora and len(together) > 1:
            raise ValueError(
                f"Cannot merge {together} into {self.module_name!r} together: DoRA adapter {dora[0]!r} rescales "
                "the whole weight, so merging it with another adapter would not equal their summed outputs. "
                "Merge one adapter at a time (unmerge the others first)."
            )

    def _create(self, adapter_name: str, r: int, config: LoraConfig, factory: dict) -> None:
        """Add the adapter's modules; `factory` holds the device and dtype for new tensors."""
        raise NotImplementedError

    def _initialise(self, adapter_name: str, init: bool | str) -> None:
        """True: Kaiming-uniform A (a=sqrt(5)), zero B. "gaussian": A ~ N(0, std=1/r), zero B.
        False: A and B both random (the adapter changes the model from the start)."""
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name]
        with torch.no_grad():
            if init is False:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
                return
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
            if b.bias is not None:
                nn.init.zeros_(b.bias)

    def get_delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        bias = self.lora_B[adapter_name].bias if adapter_name in self.lora_B else None
        if bias is None:
            return None
        return (bias * self.scaling[adapter_name]).to(self.base_layer.weight.dtype)

    def _active_here(self) -> list[str]:
        return [n for n in self._active_adapter if n in self.r]

    def _use_base_only(self) -> bool:
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return True
        return self.merged

    def _add_adapter(self, name: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`result` (the base output for input `x`) plus adapter `name`'s contribution."""
        raise NotImplementedError

    def _add_in_place(self, name: str, result: torch.Tensor, x: torch.Tensor) -> None:
        """Add adapter `name`'s contribution into `result` (no autograd: inference only)."""
        result.copy_(self._add_adapter(name, result, x))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base output plus every active adapter's; with `sample_adapters` set (a mixed
        batch), each sample gets only its own adapter, in training too."""
        names = sample_adapters_of(self)
        if names is not None:
            return self._forward_mixed(x, names, *args, **kwargs)
        if self._use_base_only():
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_here():
            result = self._add_adapter(name, result, x)
        return result

    def _forward_mixed(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        if self.merged:
            raise ValueError(
                f"{self.module_name!r} has merged adapters {self.merged_adapters}; a mixed batch "
                "(adapter_names=) needs unmerged adapters: call unmerge_adapter() first."
            )
        result = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters:
            return result
        where = self.module_name or type(self.base_layer).__name__
        positions = group_positions(names, x.shape[0], where)
        if not torch.is_grad_enabled():
            # inference: each run of consecutive samples sharing an adapter adds its rows in place
            # (views, no gather and no concatenation)
            for name, start, stop in sample_runs(names):
                if name in self.r:
                    self._add_in_place(name, result[start:stop], x[start:stop])
            return result
        if len(positions) > 1 and not is_contiguous(positions):
            # interleaved samples: gather each adapter's rows, write its output rows back in place
            # (gathered copies, so no tensor an autograd node keeps is overwritten)
            for name, rows in positions.items():
                if name in self.r:  # else "__base__", or an adapter that does not target this module
                    index = torch.tensor(rows, device=x.device)
                    piece = self._add_adapter(name, result.index_select(0, index), x.index_select(0, index))
                    result = result.index_copy_(0, index, piece)
            return result

        def run(name: str, index: slice) -> torch.Tensor:
            if name not in self.r:
                return result[index]
            return self._add_adapter(name, result[index], x[index])

        return per_sample(names, x, run, where)


class Linear(LoraLayer):
    """LoRA on `nn.Linear` or transformers' `Conv1D` (`fan_in_fan_out`: weight stored (in, out)).

    Shapes: x (..., in_features) -> (..., out_features); A (r, in_features); B (out_features, r).
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape if fan_in_fan_out else weight.shape[::-1]

    def _create(self, adapter_name: str, r: int, config: LoraConfig, factory: dict) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=config.lora_bias, **factory)

    def _base_rows(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    def _rows_to_base(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.t() if self.fan_in_fan_out else rows

    def _delta_rows(self, adapter_name: str) -> torch.Tensor:
        return (self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight) * self.scaling[
            adapter_name
        ]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """As `LoraLayer.forward`; a plain base layer and its first adapter run as one fused node."""
        first = None if args or kwargs else self._fused_adapter()
        if first is None:
            return super().forward(x, *args, **kwargs)
        a, b = self.lora_A[first].weight, self.lora_B[first]
        spec = self._spec(first, x)
        result = kernels.linear_with_adapter(
            x=x,
            base_weight=self._base_rows(),
            base_bias=self.base_layer.bias,
            weight_a=a,
            weight_b=b.weight,
            bias_b=b.bias,
            factor=self._dora_factor(first) if self.use_dora[first] else None,
            scaling=self.scaling[first],
            dropout=self.lora_dropout[first],
            hidden=None if spec is None else kernels.sibling_hidden(self, x, spec),
        )
        for name in self._active_here()[1:]:
            result = self._add_adapter(name, result, x)
        return result

    def _fused_adapter(self) -> str | None:
        """The first active adapter when this call may take the fused path (base and that adapter
        in one node, grouped with siblings), or None: step aside to `LoraLayer.forward`. It steps
        aside for a mixed batch, merged or disabled adapters, a base that is not a plain unhooked
        linear layer, and whatever `_kernels_exact` refuses."""
        if sample_adapters_of(self) is not None or self.merged or self._disable_adapters:
            return None
        names = self._active_here()
        if not names or not self._plain_base() or not self._kernels_exact(names[0]):
            return None
        return names[0]

    def _kernels_exact(self, name: str) -> bool:
        """Whether the kernels may compute adapter `name` from its weights directly: they never call
        `lora_A`, `lora_B`, `lora_dropout` or the base layer, and a group computes every member's
        hidden at the first member's call. So any hook (forward, pre-forward, backward, global) or
        instance-level `forward` on those modules or on this layer sends the adapter to
        `_add_by_modules`, which calls them as PEFT does."""
        if _global_hooks():
            return False
        modules = (self, self.base_layer, self.lora_A[name], self.lora_B[name], self.lora_dropout[name])
        return not any(map(_hooked, modules))

    def _spec(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, float, float] | None:
        """`(A, scaling, dropout p)` of adapter `name` when the fused kernel takes `x` (else None)."""
        a = self.lora_A[name].weight
        p = kernels.drop_probability(self.lora_dropout[name])
        if not kernels.fusable(x, self.base_layer.weight.dtype, a) or (p > 0 and self.use_dora[name]):
            return None
        return a, self.scaling[name], p

    def _group_spec(self, x: torch.Tensor) -> tuple[torch.Tensor, float, float] | None:
        """`(A, scaling, dropout p)` of the first active adapter when a group of layers reading `x`
        may compute its hidden (`kernels.grouped`): the fused path applies (`_fused_adapter`) and the
        kernel takes x; else None."""
        first = self._fused_adapter()
        return None if first is None else self._spec(first, x)

    def _plain_base(self) -> bool:
        """True when the base layer is an nn.Linear or Conv1D, whose forward is exactly `x W^T + b`,
        so the kernel may compute it itself (its hooks are `_kernels_exact`'s concern)."""
        base = self.base_layer
        return type(base) is nn.Linear or is_gpt2_conv1d(base)

    def _add_by_modules(self, name: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Adapter `name`'s contribution by calling `lora_dropout`, `lora_A` and `lora_B` (their
        hooks run): `result + scaling * lora_B(lora_A(dropout(x)))`, or DoRA's form of it."""
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        scaling = self.scaling[name]
        dropped = dropout(x.to(lora_a.weight.dtype))
        lora = lora_b(lora_a(dropped)) * scaling
        if not self.use_dora[name]:
            return result + lora.to(result.dtype)
        factor = self._dora_factor(name)
        bias = self.base_layer.bias
        if kernels.drop_probability(dropout) > 0:
            base_wx = F.linear(dropped.to(result.dtype), self._base_rows())
        else:
            base_wx = result if bias is None else result - bias
        return result + ((factor - 1) * base_wx.to(factor.dtype) + factor * lora).to(result.dtype)

    def _add_in_place(self, name: str, result: torch.Tensor, x: torch.Tensor) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name]
        if (
            self.use_dora[name]
            or not result.is_contiguous()
            or not kernels.fusable(x, result.dtype, a)
            or not self._kernels_exact(name)
        ):
            super()._add_in_place(name, result, x)
            return
        kernels.add_lora_linear_(
            result=result, x=x, weight_a=a, weight_b=b.weight, bias_b=b.bias, scaling=self.scaling[name]
        )

    def _add_adapter(self, name: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self._kernels_exact(name):
            return self._add_by_modules(name, result, x)
        a, b = self.lora_A[name].weight, self.lora_B[name]
        if self.use_dora[name]:
            return kernels.add_dora_linear(
                result=result,
                x=x,
                base_weight=self._base_rows(),
                base_bias=self.base_layer.bias,
                weight_a=a,
                weight_b=b.weight,
                factor=self._dora_factor(name),
                scaling=self.scaling[name],
                dropout=self.lora_dropout[name],
            )
        return kernels.add_lora_linear(
            result=result,
            x=x,
            weight_a=a,
            weight_b=b.weight,
            bias_b=b.bias,
            scaling=self.scaling[name],
            dropout=self.lora_dropout[name],
        )


class Embedding(LoraLayer):
    """LoRA on `nn.Embedding`: rows of A (r, num_embeddings) are looked up, then projected by
    B (embedding_dim, r). Default init is the reverse of Linear's: A zero, B normal.

    Dropout does not apply: there is no float input to drop (PEFT ignores it too; a warning says so).
    """

    def _create(self, adapter_name: str, r: int, config: LoraConfig, factory: dict) -> None:
        if config.lora_bias:
            raise ValueError(
                f"lora_bias=True is not supported on Embedding {self.module_name!r}; "
                "exclude it from target_modules or set lora_bias=False."
            )
        if config.lora_dropout > 0:
            warnings.warn(
                f"lora_dropout={config.lora_dropout} has no effect on Embedding {self.module_name!r}: "
                "token ids cannot be dropped out.",
                stacklevel=4,
            )
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, num, **factory))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(dim, r, **factory))

    def _initialise(self, adapter_name: str, init: bool | str) -> None:
        a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        with torch.no_grad():
            if init is False:
                nn.init.normal_(a)
                nn.init.normal_(b)
            elif init == "gaussian":
                nn.init.normal_(a, std=1 / self.r[adapter_name])
                nn.init.zeros_(b)
            else:
                nn.init.zeros_(a)
                nn.init.normal_(b)

    def set_factors(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_embedding_A[adapter_name].copy_(a)
            self.lora_embedding_B[adapter_name].copy_(b)

    def _base_rows(self) -> torch.Tensor:
        return self.base_layer.weight.t()  # (embedding_dim, num_embeddings), as PEFT's DoRA sees it

    def _rows_to_base(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.t()

    def _delta_rows(self, adapter_name: str) -> torch.Tensor:
        return (self.lora_embedding_B[adapter_name] @ self.lora_embedding_A[adapter_name]) * self.scaling[
            adapter_name
        ]

    def _add_adapter(self, name: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        if self.use_dora[name]:
            factor = self._dora_factor(name)
            return kernels.add_dora_embedding(
                result=result, ids=x, weight_a=a, weight_b=b, factor=factor, scaling=self.scaling[name],
                base=self.base_layer,
            )  # fmt: skip
        return kernels.add_lora_embedding(
            result=result, ids=x, weight_a=a, weight_b=b, scaling=self.scaling[name], base=self.base_layer
        )


class Conv(LoraLayer):
    """LoRA on `nn.Conv1d/2d/3d`: A is a rank-r convolution with the base kernel, stride, padding
    and dilation; B is a pointwise (1x1) convolution. Weight change:
    `delta[o, i, k...] = scaling * sum_r B[o, r] A[r, i, k...]`.
    """

    def _create(self, adapter_name: str, r: int, config: LoraConfig, factory: dict) -> None:
        base = self.base_layer
        if base.groups != 1:
            raise NotImplementedError(
                f"LoRA on grouped convolution {self.module_name!r} (groups={base.groups}) is not implemented; "
                "exclude it from target_modules."
            )
        conv_cls = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else _conv_class(base)
        self.lora_A[adapter_name] = conv_cls(
            base.in_channels,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
            **factory,
        )
        ones = (1,) * len(base.kernel_size)
        self.lora_B[adapter_name] = conv_cls(
            r, base.out_channels, ones, ones, bias=config.lora_bias, **factory
        )

    def _base_rows(self) -> torch.Tensor:
        return self.base_layer.weight

    def _rows_to_base(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def _delta_rows(self, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        return delta * self.scaling[adapter_name]

    def _magnitude_shape(self, rows: torch.Tensor) -> tuple[int, ...]:
        return (1, rows.shape[0]) + (1,) * (rows.dim() - 2)  # PEFT's (1, out, 1, ...)

    def _add_adapter(self, name: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        if self.use_dora[name]:
            factor = self._dora_factor(name)
            return kernels.add_dora_conv(
                result=result, x=x, base=self.base_layer, conv_a=a, weight_b=b.weight, factor=factor,
                scaling=self.scaling[name], dropout=self.lora_dropout[name],
            )  # fmt: skip
        return kernels.add_lora_conv(
            result=result, x=x, conv_a=a, weight_b=b.weight, bias_b=b.bias, scaling=self.scaling[name],
            dropout=self.lora_dropout[name],
        )  # fmt: skip


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run more than its class's forward: hooks or a patched forward."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
    )


def _global_hooks() -> bool:
    """Whether module hooks registered for every module (`register_module_forward_hook`, ...) exist."""
    return bool(
        module_hooks._global_forward_hooks
        or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks
        or module_hooks._global_backward_pre_hooks
    )


def _conv_class(base: nn.Module) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[base.weight.dim() - 2]
