"""`BottleneckConfig`: bottleneck adapters in series or in parallel, and the papers' placements.

A bottleneck adapter is `g(h) = up(act(down(h)))`, a down-projection to `bottleneck_size` m, a
non-linearity and an up-projection back, added to a sublayer's output with a residual:

    series   (Houlsby et al., 2019, arXiv:1902.00751):  y = f(x);  y + s * g(y)
    parallel (He et al., 2022, arXiv:2110.04366):       y = f(x) + s * g(x)

The presets place them as the papers do (AdapterHub's names in brackets):
    "houlsby"  ["double_seq_bn"]: series, after the attention output and the feed-forward output.
    "pfeiffer" ["seq_bn"]:        series, after the feed-forward output only (Pfeiffer et al., 2021).
    "parallel" ["par_bn"]:        parallel to the feed-forward block, scaling 4 (He et al.).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ...config import CONFIG_CLASSES, PeftConfig, PeftType, as_set_or_str, check_layer_selection
from .placements import _MODEL_FAMILY, _PRESET_ALIASES, PLACEMENTS, _known_model_types

NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
MODES = ("series", "parallel")


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters (`peft_type="BOTTLENECK"`, a lorakit type; PEFT cannot load it).

    Args:
        target_modules: the sublayers to adapt, with LoRA's matching rules: a list (exact name or
            `.`-suffix), a str (`re.fullmatch` on the full name) or None (the "pfeiffer" placement
            for series, "parallel" for parallel, from the model's `model_type`). A target may be a
            Linear, a transformers Conv1D, or any module mapping hidden states to hidden states
            (e.g. Llama's `mlp`); a tuple output adapts its first element.
        exclude_modules, layers_to_transform, layers_pattern: as in `LoraConfig`.
        mode: "series" (adapter on the sublayer's output) or "parallel" (adapter on its input,
            added to its output).
        bottleneck_size: m, the adapter's inner width. Give this or `reduction_factor`, not both.
        reduction_factor: m = max(1, d_out // reduction_factor), d_out the sublayer's output size.
        non_linearity: "relu", "gelu", "silu" or "tanh".
        scaling: s, a number, or "learned" (a trainable scalar per insertion point, starting at 1).
        dropout: dropout probability on the adapter's input, in [0, 1).
        init_weights: True: down-projection Kaiming-uniform (as nn.Linear), up-projection and all
            biases zero, so the model is unchanged at step 0. False: up-projection random too.
        layer_norm: a trainable LayerNorm on the adapter's input (AdapterHub's `ln_before`).
        modules_to_save: modules trained in full and saved beside the adapter.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    mode: Literal["series", "parallel"] = "series"
    bottleneck_size: int | None = None
    reduction_factor: int | float | None = None
    non_linearity: str = "relu"
    scaling: float | str = 1.0
    dropout: float = 0.0
    init_weights: bool = True
    layer_norm: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BOTTLENECK.value
        self.target_modules = as_set_or_str(self.target_modules, "target_modules")
        self.exclude_modules = as_set_or_str(self.exclude_modules, "exclude_modules")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        self._validate()

    def _validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not a bottleneck mode; use 'series' or 'parallel'.")
        if (self.bottleneck_size is None) == (self.reduction_factor is None):
            raise ValueError(
                f"Give exactly one of bottleneck_size and reduction_factor (got bottleneck_size="
                f"{self.bottleneck_size!r}, reduction_factor={self.reduction_factor!r}), e.g. reduction_factor=16."
            )
        size = self.bottleneck_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError(f"bottleneck_size={size!r} must be a positive integer, e.g. 64.")
        factor = self.reduction_factor
        if factor is not None and (
            isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0
        ):
            raise ValueError(f"reduction_factor={factor!r} must be a positive number, e.g. 16.")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"non_linearity={self.non_linearity!r} is not supported; use one of {list(NON_LINEARITIES)}."
            )
        scaling = self.scaling
        if scaling != "learned" and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))):
            raise ValueError(f"scaling={scaling!r} must be a number or 'learned'.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1).")
        if not isinstance(self.init_weights, bool) or not isinstance(self.layer_norm, bool):
            raise ValueError(
                f"init_weights={self.init_weights!r} and layer_norm={self.layer_norm!r} must be True or False."
            )
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern)

    def bottleneck_dim(self, out_features: int) -> int:
        """m for a sublayer with `out_features` outputs."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(out_features // self.reduction_factor))

    @classmethod
    def from_preset(
        cls, preset: str, model_type: str, train_layer_norms: bool = False, **overrides: Any
    ) -> BottleneckConfig:
        """The config of a paper's placement on a known architecture.

        Args:
            preset: "houlsby", "pfeiffer", "parallel", or AdapterHub's "double_seq_bn", "seq_bn",
                "par_bn".
            model_type: `model.config.model_type` (see `PLACEMENTS` for the supported ones).
            train_layer_norms: also train the blocks' own layer norms (as `modules_to_save`), as
                Houlsby et al. do.
            overrides: any other field (`reduction_factor`, `task_type`, ...).

        Defaults: reduction_factor 16; "houlsby" uses silu, the others relu; "parallel" scaling 4.
        """
        name = _PRESET_ALIASES.get(preset, preset)
        if name not in ("houlsby", "pfeiffer", "parallel"):
            raise ValueError(
                f"preset={preset!r} is unknown; use 'houlsby', 'pfeiffer' or 'parallel' "
                "(or AdapterHub's 'double_seq_bn', 'seq_bn', 'par_bn')."
            )
        placement = PLACEMENTS.get(_MODEL_FAMILY.get(model_type, model_type))
        if placement is None:
            raise ValueError(
                f"No bottleneck preset for model_type={model_type!r} (known: {sorted(_known_model_types())}); "
                "pass BottleneckConfig(target_modules=[...]) with your model's attention and feed-forward "
                "output modules instead."
            )
        values: dict[str, Any] = {"reduction_factor": 16, "non_linearity": "relu", "mode": "series"}
        if name == "houlsby":
            values.update(target_modules=list(placement.attention_output + placement.ffn_output))
            values.update(non_linearity="silu")
        else:
            targets = placement.ffn_output if name == "pfeiffer" else placement.ffn_block
            values.update(target_modules=list(targets), exclude_modules=list(placement.ffn_exclude) or None)
        if name == "parallel":
            values.update(mode="parallel", scaling=4.0)
        if train_layer_norms:
            values.update(modules_to_save=list(placement.layer_norms))
        if "bottleneck_size" in overrides:
            values.pop("reduction_factor")
        values.update(overrides)
        return cls(**values)

    @classmethod
    def houlsby(cls, model_type: str, **overrides: Any) -> BottleneckConfig:
        """`from_preset("houlsby", model_type, ...)`: series adapters after attention and feed-forward."""
        return cls.from_preset("houlsby", model_type, **overrides)

    @classmethod
    def pfeiffer(cls, model_type: str, **overrides: Any) -> BottleneckConfig:
        """`from_preset("pfeiffer", model_type, ...)`: one series adapter after the feed-forward."""
        return cls.from_preset("pfeiffer", model_type, **overrides)

    @classmethod
    def parallel(cls, model_type: str, **overrides: Any) -> BottleneckConfig:
        """`from_preset("parallel", model_type, ...)`: a parallel adapter beside the feed-forward."""
        return cls.from_preset("parallel", model_type, **overrides)


def default_targets(model_type: str | None, mode: str) -> tuple[set[str], set[str] | None]:
    """`target_modules=None`: the "pfeiffer" (series) or "parallel" placement's targets and excludes.

    Raises:
        ValueError: no placement is known for `model_type`.
    """
    preset = BottleneckConfig.from_preset("pfeiffer" if mode == "series" else "parallel", model_type or "")
    return preset.target_modules, preset.exclude_modules


CONFIG_CLASSES[PeftType.BOTTLENECK.value] = BottleneckConfig
