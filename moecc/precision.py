"""Precision-lowering configuration: which weight format the routed experts are stored in.

    torch.compile(model, backend="moecc", options={"precision": "int4"})
    torch.compile(model, backend="moecc", options={"precision": Int4WeightOnly(group_size=64)})

A config is a small frozen, versioned dataclass (the torchao style). Each names a packed
weight format (moecc/backends/reference/quantized.py defines the layout and the
dequantisation that is its semantics), the accuracy it must reach, and what to do when
it cannot:

    min_weight_sqnr  dB; every expert's quantised weights must reach it
                     (SQNR = 20*log10(|w| / |w - dequant(quant(w))|))
    min_output_sqnr  dB; the layer's output on random hidden states must reach it
    fallback         the next config to try when a bound is missed or the shape does not
                     fit the format (int4 -> int8 -> the original dtype); None: keep the
                     original weights
    strict           refuse (raise PrecisionError) instead of falling back
    activations      "float" (weight-only: the experts compute on the dequantised
                     weights in the model's precision) or "int8" (w8a8 / w4a8: each
                     expert's inputs are quantised dynamically to int8 per row and
                     weight group, and the CPU kernels use integer dot products, AVX512-
                     VNNI; llama.cpp's Q8_0 / Q4_K do the same). "int8" is faster on CPUs
                     and adds the activations' rounding error, which the output bound
                     measures; elsewhere such layers run on the reference op.

Default bounds (why these numbers): symmetric absmax quantisation of Gaussian-like
weights gives about 20 dB for int4 in groups of 32-128 and 43-45 dB for int8 per row;
on qwen3-moe-stdlib the worst expert measured 20.0 dB (int4 g32) and 43.4 dB (int8),
the layer outputs 18.4 and 42.1 dB (docs/precision.md). The defaults (int4 15 / 12 dB,
int8 35 / 30 dB, weights / output) sit 5-12 dB below that, so ordinary trained weights
pass and a layer whose outliers ruin the format falls back. fp8 (e4m3, 3 mantissa bits,
128 x 128 blocks) reaches about 31 dB on such weights; its defaults are 25 / 20 dB and it
falls back to the original weights. Only the routed expert stack is lowered; router,
norms and attention keep their dtype.

Per-layer overrides by module path (`PerLayerPrecision`; dict form {"format": "int4",
"overrides": {"model.layers.0.mlp": "int8", "model.layers.3.*": None}}): fnmatch
patterns -> a config (any form parse_precision takes) or None (keep the original
weights). An exact path wins over patterns; among patterns the first listed that
matches wins; a path no pattern matches gets the default. The precision pass and
moecc.quantize_ resolve each layer with `config_for`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Optional, Union

SHORTHANDS = ("int8", "int4", "w8a8", "w4a8", "fp8")  # w*a8: int8 activations too
ACTIVATIONS = ("float", "int8")
FP8_ACTIVATIONS = ("weight_only", "dynamic")  # Fp8BlockScaled.activations


class PrecisionError(ValueError):
    """A bad precision option, or a strict config whose format cannot be used."""


@dataclass(frozen=True)
class Int8WeightOnly:
    """int8 weights (symmetric, [-127, 127]), fp32 scales per group of `group_size` along
    the reduction axis; group_size=None: one scale per row (the whole reduction axis)."""

    group_size: Optional[int] = None
    min_weight_sqnr: float = 35.0
    min_output_sqnr: float = 30.0
    fallback: Optional["PrecisionConfig"] = None
    strict: bool = False
    activations: str = "float"
    VERSION = 1
    weight_format = "int8"

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass(frozen=True)
class Int4WeightOnly:
    """int4 weights (symmetric, [-8, 7], stored as q + 8, two per byte, low nibble first),
    fp32 scales per group of `group_size` (even) along the reduction axis."""

    group_size: int = 128
    min_weight_sqnr: float = 15.0
    min_output_sqnr: float = 12.0
    fallback: Optional["PrecisionConfig"] = dataclasses.field(default_factory=lambda: Int8WeightOnly())
    strict: bool = False
    activations: str = "float"
    VERSION = 1
    weight_format = "int4"

    def __post_init__(self) -> None:
        _check_common(self)
        if self.group_size is None or self.group_size % 2:
            raise PrecisionError(f"Int4WeightOnly.group_size must be an even int (two values per byte), "
                                 f"got {self.group_size!r}")


@dataclass(frozen=True)
class Fp8BlockScaled:
    """fp8 e4m3fn weights with one fp32 scale per block of `block` = (rows, columns) values
    (DeepSeek-V3's checkpoint format: scale = absmax / 448 per block; the last block of a
    row or column range that `block` does not divide is shorter, the scale grids are
    ceil-sized). Only square blocks are implemented (the layer spec carries one edge).

    activations: "weight_only" (the experts compute in the model's dtype on the decoded
        weights: what every CPU runs) or "dynamic" (w8a8: activations quantised to fp8
        per token and column block, fp8 tensor cores). No kernel implements "dynamic"
        yet: the pass falls back to "weight_only" with a note, or raises with strict.
    """

    block: tuple = (128, 128)
    activations: str = "weight_only"
    min_weight_sqnr: float = 25.0
    min_output_sqnr: float = 20.0
    fallback: Optional["PrecisionConfig"] = None
    strict: bool = False
    VERSION = 1
    weight_format = "fp8"

    def __post_init__(self) -> None:
        block = self.block
        if isinstance(block, list):
            block = tuple(block)
            object.__setattr__(self, "block", block)
        if not (isinstance(block, tuple) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise PrecisionError(f"Fp8BlockScaled.block must be (rows, columns), two positive ints, got {self.block!r}")
        if block[0] != block[1]:
            raise PrecisionError(f"Fp8BlockScaled.block {block}: only square blocks are implemented, "
                                 f"e.g. (128, 128) (DeepSeek-V3) or (64, 64)")
        if self.activations not in FP8_ACTIVATIONS:
            raise PrecisionError(f"Fp8BlockScaled.activations must be one of {FP8_ACTIVATIONS}, "
                                 f"got {self.activations!r}")
        _check_common(self, activations=False)

    @property
    def group_size(self) -> int:
        """Columns per scale along the reduction axis (the block's edge; spec.experts.group_size)."""
        return self.block[1]


PrecisionConfig = Union[Int8WeightOnly, Int4WeightOnly, Fp8BlockScaled]
CONFIG_TYPES = (Int8WeightOnly, Int4WeightOnly, Fp8BlockScaled)
FORMATS = {"int8": Int8WeightOnly, "int4": Int4WeightOnly, "fp8": Fp8BlockScaled}  # dict form's "format"


@dataclass(frozen=True)
class PerLayerPrecision:
    """A default config plus overrides by module path (fnmatch patterns).

    overrides: {pattern: config or None} (a dict, or a tuple of pairs; values in any form
        parse_precision takes: "int8", {"format": ...}, a config, None / "dense" = keep the
        original weights). Stored as a tuple of pairs so the value stays hashable.
    strict: a pattern that matches no MoE layer of the model is an error in
        moecc.quantize_ (it sees every layer) instead of a reported note. The compile
        pass always notes it: one Dynamo graph may hold only some of the layers.
    """

    default: Optional[PrecisionConfig]
    overrides: tuple = ()
    strict: bool = False
    VERSION = 1

    def __post_init__(self) -> None:
        if self.default is not None and not isinstance(self.default, CONFIG_TYPES):
            raise PrecisionError(f"PerLayerPrecision.default must be None or a config, got {self.default!r}")
        pairs = self.overrides.items() if isinstance(self.overrides, dict) else self.overrides
        parsed = []
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]):
                raise PrecisionError(f"precision overrides map module-path patterns (str) to formats, got {pair!r}")
            pattern, value = pair
            if isinstance(value, PerLayerPrecision) or isinstance(value, dict) and "overrides" in value:
                raise PrecisionError(f"override {pattern!r}: overrides do not nest")
            try:
                parsed.append((pattern, parse_precision(value)))
            except PrecisionError as exc:
                raise PrecisionError(f"override {pattern!r}: {exc}") from exc
        object.__setattr__(self, "overrides", tuple(parsed))
        if not isinstance(self.strict, bool):
            raise PrecisionError(f"PerLayerPrecision.strict must be True or False, got {self.strict!r}")

    def config_for(self, path: str) -> Optional[PrecisionConfig]:
        """The config of the layer at module path `path` (None: keep its weights)."""
        pattern = self.matching_pattern(path)
        return self.default if pattern is None else dict(self.overrides)[pattern]

    def matching_pattern(self, path: str) -> Optional[str]:
        """The override that decides `path`: the exact path, else the first matching pattern."""
        for pattern, _ in self.overrides:
            if pattern == path:
                return pattern
        return next((p for p, _ in self.overrides if fnmatch.fnmatchcase(path, p)), None)

    def unmatched(self, paths) -> list[str]:
        """Override patterns that decide none of `paths` (typos, or layers not captured)."""
        used = {self.matching_pattern(p) for p in paths}
        return [p for p, _ in self.overrides if p not in used]


def config_for(precision, path: str) -> Optional[PrecisionConfig]:
    """The config for the layer at module path `path` under `precision` (a config, a
    PerLayerPrecision or None)."""
    if isinstance(precision, PerLayerPrecision):
        return precision.config_for(path)
    return precision


def _check_common(cfg, activations: bool = True) -> None:
    name = type(cfg).__name__
    if cfg.group_size is not None and (not isinstance(cfg.group_size, int) or isinstance(cfg.group_size, bool)
                                       or cfg.group_size < 1):
        raise PrecisionError(f"{name}.group_size must be a positive int, got {cfg.group_size!r}")
    for bound in ("min_weight_sqnr", "min_output_sqnr"):
        if not isinstance(getattr(cfg, bound), (int, float)) or isinstance(getattr(cfg, bound), bool):
            raise PrecisionError(f"{name}.{bound} must be a number of dB, got {getattr(cfg, bound)!r}")
    if cfg.fallback is not None and not isinstance(cfg.fallback, CONFIG_TYPES):
        raise PrecisionError(f"{name}.fallback must be None or one of "
                             f"{', '.join(t.__name__ for t in CONFIG_TYPES)}, got {cfg.fallback!r}")
    if not isinstance(cfg.strict, bool):
        raise PrecisionError(f"{name}.strict must be True or False, got {cfg.strict!r}")
    if activations and cfg.activations not in ACTIVATIONS:
        raise PrecisionError(f"{name}.activations must be one of {ACTIVATIONS}, got {cfg.activations!r}")


def parse_precision(value) -> Optional[PrecisionConfig]:
    """options["precision"] -> a config (None: keep the model's weights as they are).

    Accepts None, "dense", the shorthands "int8" / "int4" / "fp8" (default configs), a config
    object, a PerLayerPrecision, or a dict {"format": "int4", <field>: value, ...} (JSON
    options, `moecc eval --options`), optionally with "overrides": {pattern: format}
    (then the result is a PerLayerPrecision; "format": "dense" quantises only the
    overridden layers; "strict" applies to the default config and to unmatched
    patterns). Anything else is an error listing what is valid.
    """
    if value is None or value == "dense":
        return None
    if isinstance(value, (*CONFIG_TYPES, PerLayerPrecision)):
        return value
    if isinstance(value, dict) and "overrides" in value:
        raw = dict(value)
        overrides = raw.pop("overrides")
        if not isinstance(overrides, dict):
            raise PrecisionError(f"precision 'overrides' must be a dict {{module-path pattern: format}}, "
                                 f"got {type(overrides).__name__}")
        if raw.get("format") in ("dense", None):  # only the overridden layers are quantised
            extra = sorted(set(raw) - {"format", "strict"})
            if extra:
                raise PrecisionError(f"precision fields {extra} need a 'format' {tuple(FORMATS)}")
            default = None
        else:
            default = parse_precision(raw)
        return PerLayerPrecision(default, overrides, strict=bool(raw.get("strict", False)))
    if isinstance(value, str):
        if value == "int8":
            return Int8WeightOnly()
        if value == "int4":
            return Int4WeightOnly()
        if value == "w8a8":
            return Int8WeightOnly(activations="int8")
        if value == "w4a8":  # falls back to w8a8, then to the original weights
            return Int4WeightOnly(activations="int8", fallback=Int8WeightOnly(activations="int8"))
        if value == "fp8":
            return Fp8BlockScaled()
        raise PrecisionError(f"unknown precision {value!r}; valid: None, 'dense', "
                             f"{', '.join(repr(s) for s in SHORTHANDS)}, "
                             f"{', '.join(t.__name__ + '(...)' for t in CONFIG_TYPES)}")
    if isinstance(value, dict):
        raw = dict(value)
        fmt = raw.pop("format", None)
        cls = FORMATS.get(fmt)  # activations= is a field
        if cls is None:
            raise PrecisionError(f"precision dict needs 'format' one of {tuple(FORMATS)}, got {fmt!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(valid))
        if unknown:
            raise PrecisionError(f"unknown {cls.__name__} field(s) {unknown}; valid: {', '.join(valid)}")
        if isinstance(raw.get("fallback"), (str, dict)):
            raw["fallback"] = parse_precision(raw["fallback"])
        return cls(**raw)
    raise PrecisionError(f"moecc option 'precision' must be None, a string {SHORTHANDS}, a dict or a config "
                         f"object ({', '.join(t.__name__ for t in CONFIG_TYPES)}); got {type(value).__name__}")


def chain(config: Optional[PrecisionConfig]) -> list[PrecisionConfig]:
    """The config and its fallbacks in the order they are tried (no cycles: configs are values)."""
    if isinstance(config, PerLayerPrecision):
        raise PrecisionError("per-layer overrides: resolve the layer's config with "
                             "moecc.precision.config_for(precision, module_path) first")
    out = []
    while config is not None and len(out) < 8:
        out.append(config)
        config = config.fallback
    return out


def format_name(config: PrecisionConfig) -> str:
    """'int4 g128', 'int8 per-row', 'int4 g128 a8' (int8 activations), 'fp8 b128'
    (block 128 x 128; 'fp8 b128 dynamic': fp8 activations asked for)."""
    if config.weight_format == "fp8":
        return f"fp8 b{config.block[0]}{' dynamic' if config.activations == 'dynamic' else ''}"
    g = f"g{config.group_size}" if config.group_size else "per-row"
    return f"{config.weight_format} {g}{' a8' if config.activations == 'int8' else ''}"


def describe(config) -> str:
    """One line: 'int4 g128 (>= 15 dB weights, >= 12 dB output) -> int8 per-row -> dense'
    (per-layer overrides: the default, then '; <pattern>: <its chain>' each)."""
    if isinstance(config, PerLayerPrecision):
        return "; ".join([describe(config.default)]
                         + [f"{p}: {describe(c) if c is not None else 'kept'}" for p, c in config.overrides])
    parts = []
    for c in chain(config):
        parts.append(f"{format_name(c)} (>= {c.min_weight_sqnr:g} dB weights, "
                     f">= {c.min_output_sqnr:g} dB output{', strict' if c.strict else ''})")
    return " -> ".join(parts + ["dense"])
