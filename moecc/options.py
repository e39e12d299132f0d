"""Typed, validated compile options: what `torch.compile(..., options={...})` may say.

    torch.compile(model, backend="moecc", options={"kernel_backend": "triton"})

An unknown key or a bad value is an error that lists what is valid. Options are a frozen
value passed down the pipeline; nothing is stored globally.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

KERNEL_BACKENDS = ("auto", "reference", "triton", "tvm")
GRAPH_BACKENDS = ("inductor", "eager")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class OptionsError(ValueError):
    """A bad torch.compile option for the moecc backend."""


@dataclass(frozen=True)
class CompileOptions:
    """Options of the moecc backend.

    kernel_backend: which kernels run the MoE layers. "auto" picks Triton on CUDA GPUs,
        TVM on CPU when apache-tvm is installed, else the reference (plain torch).
    rest_of_graph: "inductor" compiles everything that is not an MoE layer with Inductor;
        "eager" runs it as captured (fastest to compile, useful for debugging).
    fuse_shared_experts: fold shared experts into the routed stack as always-active experts.
    verify_capture: check each recognised layer numerically against the original subgraph
        (random hidden states, the real weights) before replacing it.
    dump_graphs: a folder; the graph after capture and after each pass is written there.
    release_original_weights: where a derived weight (e.g. routed + shared experts in one
        stack) contains an original parameter unchanged, rebind that parameter to a view of
        the derived tensor so the two share memory. The model keeps working; its parameter
        now aliases moecc's tensor. Off by default because it changes parameter storage.
    decode_gemv: on the CPU, run one-row bfloat16 linear layers (batch-1 decode) as
        matrix-vector products (passes/decode_gemv.py); False keeps torch's GEMM path.
    precision: lower the routed experts' weights to a packed format (moecc/precision.py):
        None (keep them), "int8", "int4", a dict {"format": "int4", ...} or a config object
        (moecc.Int4WeightOnly(group_size=64)); each layer falls back down the config's
        chain where its accuracy bound is missed (reported), or raises with strict=True.
    quantize_linears: with `precision` set, lower the other linear layers too (attention
        projections, dense MLPs, the LM head; passes/linear_precision.py) to the same
        format, each under the config's weight-SQNR bound; False (default) lowers only the
        routed experts.
    prune_experts: remove rarely used experts (passes/prune_experts.py, moecc/pruning.py,
        docs/pruning.md): None, or {"stats": PATH or RoutingStats, "keep": 0.75 (or
        "max_loss": nats, with optional "data": the pass then chooses keep on held-out
        text, moecc/pruning_budget.py), "criterion": "reap" | "reap_sum" | "frequency" |
        "random", "protect_super_experts": True, "seed": 0, "certified": False};
        "certified": True (with or without statistics) also
        removes experts the router weights prove unreachable (moecc/expert_certificates.py).
        Statistics that do not fit the model are an error, never ignored.
    kv_rewrite: rewrite attention over the KV cache where it matches exactly: multi-head
        latent attention (DeepSeek-V2/V3-style MLA) runs absorbed over the latent cache
        (passes/mla_absorb.py, moecc/mla.py), grouped-query attention reads the cache in
        place, without repeated heads, only over the valid slots on the CPU
        (passes/gqa_decode.py, moecc/gqa.py); docs/kv_cache.md. False leaves it as captured.
    huge_pages: on the CPU, move the weights the compiled graph reads (every tensor of at
        least 2 MiB) onto 2 MiB pages in place (passes/huge_pages.py, moecc/huge_pages.py):
        streaming them on 4 KiB pages is bound by address translation, 2-4x slower on the
        build VM. Values and tensors are unchanged; costs ~1-1.5 s per GiB once. Linux only.
    mode: torch.compile's mode. torch.compile refuses `mode=` together with `options=`,
        so the mode may also be given as options={"mode": "reduce-overhead", ...}.
    report: a moecc.CompileReport the caller owns; every compiled graph appends what
        capture and each pass did (also logged to the `moecc` loggers).
    """

    kernel_backend: str = "auto"
    rest_of_graph: str = "inductor"
    fuse_shared_experts: bool = True
    verify_capture: bool = True
    dump_graphs: Optional[str] = None
    release_original_weights: bool = False
    decode_gemv: bool = True
    kv_rewrite: bool = True
    quantize_linears: bool = False
    huge_pages: bool = True
    report: Optional[Any] = field(default=None, compare=False)  # a moecc.CompileReport to fill
    mode: Optional[str] = None
    precision: Optional[Any] = None  # parsed to a moecc.precision config (or None)
    prune_experts: Optional[Any] = None  # parsed to a moecc.pruning.PruneConfig (or None)

    def __post_init__(self) -> None:
        from moecc.precision import PrecisionError, parse_precision

        try:
            object.__setattr__(self, "precision", parse_precision(self.precision))
        except PrecisionError as exc:
            raise OptionsError(f"moecc option 'precision': {exc}") from exc
        from moecc.pruning import PruningError, parse_prune_config

        try:
            object.__setattr__(self, "prune_experts", parse_prune_config(self.prune_experts))
        except PruningError as exc:
            raise OptionsError(f"moecc option 'prune_experts': {exc}") from exc
        _choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        _choice("rest_of_graph", self.rest_of_graph, GRAPH_BACKENDS)
        _choice("mode", self.mode, MODES)
        for name in ("fuse_shared_experts", "verify_capture", "release_original_weights", "decode_gemv",
                     "kv_rewrite", "quantize_linears", "huge_pages"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"moecc option {name!r} must be True or False, got {getattr(self, name)!r}")
        from moecc.capture.report import CompileReport

        if self.report is not None and not isinstance(self.report, CompileReport):
            raise OptionsError(f"moecc option 'report' must be a moecc.CompileReport, got {type(self.report).__name__}")
        if self.dump_graphs is not None and not isinstance(self.dump_graphs, str):
            raise OptionsError(f"moecc option 'dump_graphs' must be a folder path, got {self.dump_graphs!r}")

    @staticmethod
    def from_torch_compile(options: Optional[dict[str, Any]], mode: Optional[str] = None) -> "CompileOptions":
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(CompileOptions)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise OptionsError(
                f"unknown moecc option(s) {unknown}; valid options: {', '.join(valid)}"
            )
        if mode is not None and options.get("mode") not in (None, mode):
            raise OptionsError(f"mode given twice: mode={mode!r} and options['mode']={options['mode']!r}")
        options.setdefault("mode", mode)
        return CompileOptions(**options)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed if a is not None)
        raise OptionsError(f"moecc option {name!r} must be one of {shown}; got {value!r}")
