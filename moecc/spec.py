"""The typed description of one captured MoE layer.

A `MoELayerSpec` says everything about a layer except its tensors: how the router scores
and selects experts, how the expert weights are laid out, and which activation joins the
gate and up projections. Capture builds one per recognised region; the moecc custom op
carries it (serialised by `to_json`) so every backend sees the same facts.

Dimension legend used across moecc:
    T = tokens, K = hidden size, N = expert intermediate size, E = routed experts,
    S = shared (always-active) experts, k = experts selected per token (top-k).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

SCORINGS = ("softmax", "sigmoid", "topk_softmax", "sqrt_softplus", "sparsemixer")
GROUP_SCORINGS = ("top2_sum", "max")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "swiglu_oai", "swiglu_softcap", "relu2")
GATE_UP_LAYOUTS = ("concat", "interleaved", "separate")
WEIGHT_FORMATS = ("dense", "int8", "int4", "fp8")
ACTIVATION_FORMATS = ("float", "int8")  # ExpertSpec.activations: kept as they are, or dynamic int8


class SpecError(ValueError):
    """A spec whose fields contradict each other or name an unknown variant."""


@dataclass(frozen=True)
class RouterSpec:
    """How a token's experts and their weights are chosen.

    scoring:
        "softmax"      softmax over all E logits, then top-k of the probabilities
                       (Mixtral, Qwen3-MoE).
        "sigmoid"      sigmoid of each logit; selection uses sigmoid + correction bias,
                       the weights use the plain sigmoid (DeepSeek-V3).
        "topk_softmax" top-k of the raw logits, then softmax over those k (GPT-OSS).
        "sqrt_softplus" sqrt(softplus(logit)) per expert, otherwise as "sigmoid"
                       (DeepSeek-V4).
        "sparsemixer"  PhiMoE at inference, top-2 only: expert 1 is the argmax; its weight
                       is its softmax probability among the logits within a relative
                       2*sparsemixer_eps of the max; expert 2 likewise among the rest.
    n_group / topk_group: group-limited selection (DeepSeek): experts are split into
        n_group groups, each group scored (`group_scoring`), only the best topk_group
        groups stay eligible. n_group == 1 disables it.
    renormalize: divide the k weights by their sum, clamped below at renormalize_min
        (ERNIE), plus renormalize_eps.
    routed_scaling_factor: multiply the final weights (DeepSeek-V3: 2.5; Beam multiplies
        the routed experts' sum instead, which is the same linear map).
    has_correction_bias with "softmax" scoring: the bias is added to the softmax
        probabilities for selection only (ERNIE 4.5's moe_statics), as for sigmoid.
    logits_in_fp32: the router matmul runs in fp32 (DeepSeek casts both operands).
    select_on_logits: selection ranks the raw logits (+ correction bias) instead of the
        scores; the weights are still the scores of the selected experts (Kolibri: sigmoid
        of the gathered logits). With a bias this selects differently from ranking scores.
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    group_scoring: str = "top2_sum"
    has_router_bias: bool = False
    has_correction_bias: bool = False
    renormalize: bool = False
    renormalize_eps: float = 0.0
    renormalize_min: float = 0.0
    routed_scaling_factor: float = 1.0
    logits_in_fp32: bool = False
    select_on_logits: bool = False
    sparsemixer_eps: float = 0.0
    masked_experts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # JSON gives a list; a tuple keeps the frozen spec hashable.
        object.__setattr__(self, "masked_experts", tuple(self.masked_experts))

    def validate(self) -> None:
        if self.scoring not in SCORINGS:
            raise SpecError(f"router scoring {self.scoring!r} is not one of {SCORINGS}")
        if self.group_scoring not in GROUP_SCORINGS:
            raise SpecError(f"group scoring {self.group_scoring!r} is not one of {GROUP_SCORINGS}")
        if not 1 <= self.top_k <= self.num_experts:
            raise SpecError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise SpecError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise SpecError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise SpecError("top_k exceeds the experts left eligible by group-limited routing")
        if self.scoring == "sparsemixer" and (self.top_k != 2 or self.n_group != 1 or self.renormalize):
            raise SpecError("sparsemixer routing is defined for top_k=2 without groups or renormalisation")
        if self.has_correction_bias and self.scoring in ("topk_softmax", "sparsemixer"):
            raise SpecError(f"a score-correction bias is not defined for {self.scoring} scoring")
        masked = self.masked_experts
        if masked and (list(masked) != sorted(set(masked)) or masked[0] < 0 or masked[-1] >= self.num_experts
                       or self.top_k > self.num_experts - len(masked) or self.scoring == "sparsemixer"):
            raise SpecError(f"masked_experts {list(masked)} must be sorted unique ids below num_experts="
                            f"{self.num_experts}, leave at least top_k={self.top_k} experts, and not be used "
                            "with sparsemixer scoring")


@dataclass(frozen=True)
class ExpertSpec:
    """Shape, layout and activation of the routed (and shared) experts.

    Source layouts the reference op accepts (canonical is the first of each):
        gate_up_layout "concat":      gate_up [E, 2N, K], rows [0, N) gate, [N, 2N) up
                       "interleaved": gate_up rows alternate gate, up (GPT-OSS)
                       "separate":    gate [E, N, K] and up [E, N, K] as two tensors
        gate_up_transposed: stored as [E, K, 2N] (or [E, K, N] when separate)
        down_transposed:    down stored as [E, N, K] instead of [E, K, N]
    `gated=False` (NemotronH): each expert is down(act(up(x))) with no gate; gate_up then
    holds the up projection alone, [E, N, K] (shared MLPs likewise, in shared_gate), and
    the activation is applied to it ("relu2": relu(x)^2, or silu / gelu / gelu_tanh).
    Activations (act(gate) * up unless said otherwise): "silu"; "gelu_tanh"; "gelu" (exact
    erf); "swiglu_oai" (GPT-OSS, clamped with swiglu_limit, alpha-scaled sigmoid, up + 1);
    "swiglu_softcap" (Inkling2, in fp32): gate_softcap*tanh(gate/gate_softcap) *
    sigmoid(gate) * up_softcap*tanh(up/up_softcap).
    Shared experts (DeepSeek) are a dense SwiGLU MLP of width num_shared * N applied to
    every token with weight 1; `shared_fused` says they were appended to the routed stack
    (experts E .. E+S-1) by the expert-fusion pass instead of being separate tensors.
    `shared_intermediate_size` (0: S*N): a shared MLP whose width Ns is not a multiple of
    N; it counts as S = ceil(Ns/N) experts, zero-padded to S*N (exact: the padded
    channels meet zero columns of down).
    `shared_gate_up_fused` (MiniMax-M3): the shared MLP's gate and up are one Linear,
    [2*S*N, K] with gate rows first, passed as shared_gate (shared_up absent).
    `shared_gated` (Qwen2-MoE, Qwen3-Next): the shared experts' output is multiplied by
    sigmoid(x @ shared_expert_gate^T), one scalar per token, instead of weight 1.
    `weight_format` "int8" / "int4" (set by passes/precision_lowering.py, canonical layout
    only): gate_up and down are packed uint8 with fp32 scales per `group_size` values
    along the reduction axis (0: one group per row); the experts compute in the model's
    dtype on the dequantised weights (backends/reference/quantized.py). "fp8": gate_up and
    down are float8_e4m3fn with fp32 scales per square block of `group_size` rows and
    columns (DeepSeek-V3's layout).
    `activations` "int8" (quantised weights only; w8a8 / w4a8): each expert's inputs (the
    hidden states before gate_up, the activated rows before down) are quantised
    dynamically to int8, symmetric, one scale per token row and weight group
    (backends/reference/quantized.quantize_activations); "float" keeps them as they are.
    """

    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    gate_softcap: float = 0.0
    up_softcap: float = 0.0
    gate_up_layout: str = "concat"
    gate_up_transposed: bool = False
    down_transposed: bool = False
    has_bias: bool = False
    num_shared: int = 0
    shared_fused: bool = False
    shared_gated: bool = False
    shared_gate_up_fused: bool = False
    shared_intermediate_size: int = 0
    gated: bool = True
    weight_format: str = "dense"
    group_size: int = 0
    activations: str = "float"

    @property
    def canonical(self) -> bool:
        """True when the layout is what the kernels take: concat, not transposed."""
        return (
            self.gate_up_layout == "concat"
            and not self.gate_up_transposed
            and not self.down_transposed
            and (self.num_shared == 0 or self.shared_fused)
        )

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise SpecError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.gate_up_layout not in GATE_UP_LAYOUTS:
            raise SpecError(f"gate/up layout {self.gate_up_layout!r} is not one of {GATE_UP_LAYOUTS}")
        if self.hidden_size < 1 or self.intermediate_size < 1 or self.num_shared < 0:
            raise SpecError("hidden_size and intermediate_size must be positive, num_shared >= 0")
        if self.gated == (self.activation == "relu2") or (not self.gated and self.activation not in (
                "relu2", "silu", "gelu", "gelu_tanh")):
            raise SpecError(f"activation {self.activation!r} is not defined for gated={self.gated}")
        if not self.gated and (self.gate_up_layout != "concat" or self.shared_gate_up_fused or self.shared_gated):
            raise SpecError("non-gated experts take the concat layout without fused or gated shared experts")
        if self.activation == "swiglu_softcap" and (self.gate_softcap <= 0 or self.up_softcap <= 0):
            raise SpecError("swiglu_softcap needs positive gate_softcap and up_softcap")
        if self.shared_intermediate_size and not (
                (self.num_shared - 1) * self.intermediate_size < self.shared_intermediate_size
                <= self.num_shared * self.intermediate_size):
            raise SpecError(f"shared_intermediate_size={self.shared_intermediate_size} does not fit "
                            f"num_shared={self.num_shared} experts of width {self.intermediate_size}")
        if self.shared_gated and not self.num_shared:
            raise SpecError("shared_gated needs shared experts (num_shared > 0)")
        if self.weight_format not in WEIGHT_FORMATS:
            raise SpecError(f"weight format {self.weight_format!r} is not one of {WEIGHT_FORMATS}")
        if self.weight_format != "dense" and not self.canonical:
            raise SpecError("quantised expert weights need the canonical layout (run expert fusion first)")
        if self.group_size < 0 or (self.weight_format == "dense" and self.group_size):
            raise SpecError("group_size is a non-negative int, and only meaningful for quantised weights")
        if self.weight_format == "fp8" and (self.group_size < 1 or self.activations != "float"):
            raise SpecError("fp8 expert weights need a block size (group_size > 0) and float activations")
        if self.activations not in ACTIVATION_FORMATS or (self.activations != "float" and self.weight_format == "dense"):
            raise SpecError(f"activations {self.activations!r}: one of {ACTIVATION_FORMATS}, and 'int8' only "
                            "with quantised (int8 / int4) weights")


@dataclass(frozen=True)
class MoELayerSpec:
    """Router + experts: the whole semantics of one MoE layer."""

    router: RouterSpec
    experts: ExpertSpec
    source: str = field(default="", compare=False)  # e.g. the module path; informational

    def __post_init__(self) -> None:
        self.router.validate()
        self.experts.validate()

    def to_json(self) -> str:
        """Serialise for the custom op's `spec` string argument (stable key order).

        Memoised on the (frozen) instance: the kernels' per-call key lookup uses it, and
        serialising costs ~40 us, 3-5% of a decode-sized layer call on a CPU."""
        text = self.__dict__.get("_json")
        if text is None:
            text = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
            object.__setattr__(self, "_json", text)
        return text

    @staticmethod
    def from_json(text: str) -> "MoELayerSpec":
        return _parse_spec(text)

    def replace(self, *, router: dict | None = None, experts: dict | None = None) -> "MoELayerSpec":
        """A copy with some router/expert fields changed (validated again)."""
        return MoELayerSpec(
            router=dataclasses.replace(self.router, **(router or {})),
            experts=dataclasses.replace(self.experts, **(experts or {})),
            source=self.source,
        )

    def describe(self) -> str:
        """One line for logs and `moecc explain`."""
        r, e = self.router, self.experts
        parts = [f"E={r.num_experts} top{r.top_k} {r.scoring}"]
        if r.n_group > 1:
            parts.append(f"groups {r.topk_group}/{r.n_group}")
        if r.has_correction_bias:
            parts.append("corr-bias")
        if r.select_on_logits:
            parts.append("select on logits")
        if r.masked_experts:
            parts.append(f"{len(r.masked_experts)} masked")
        if r.renormalize:
            parts.append("renorm")
        if r.routed_scaling_factor != 1.0:
            parts.append(f"scale {r.routed_scaling_factor:g}")
        parts.append(f"K={e.hidden_size} N={e.intermediate_size} {e.activation}{'' if e.gated else ' (no gate)'}")
        if e.has_bias:
            parts.append("bias")
        if e.num_shared:
            parts.append(f"{e.num_shared} shared{' gated' if e.shared_gated else ''}"
                         f"{' (fused)' if e.shared_fused else ''}")
        parts.append(f"layout={e.gate_up_layout}{'^T' if e.gate_up_transposed else ''}")
        if e.weight_format != "dense":
            parts.append(f"{e.weight_format} {'g' + str(e.group_size) if e.group_size else 'per-row'}"
                         f"{' a8' if e.activations == 'int8' else ''}")
        return ", ".join(parts)


@functools.lru_cache(maxsize=256)
def _parse_spec(text: str) -> MoELayerSpec:
    try:
        raw = json.loads(text)
        return MoELayerSpec(
            router=RouterSpec(**raw["router"]),
            experts=ExpertSpec(**raw["experts"]),
            source=raw.get("source", ""),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise SpecError(f"not a valid moecc layer spec: {exc}") from exc


def kernel_unsupported(spec: MoELayerSpec, backend: str = "") -> list[str]:
    """Variants of this layer that only the reference op implements (empty: every backend;
    with `backend` "tvm" or "triton": that backend).

    The Triton and TVM kernels implement the variants their docs list (softmax / sigmoid /
    top-k-softmax routing with groups and biases; SiLU, tanh-GELU and GPT-OSS SwiGLU);
    the TVM op also masked (pruned) experts (it routes with the reference router);
    the lowering pass keeps a layer that needs anything else on the reference op.
    """
    missing = []
    if spec.router.has_correction_bias and spec.router.scoring != "sigmoid":
        missing.append("correction bias with softmax scoring")
    if spec.router.scoring in ("sqrt_softplus", "sparsemixer"):
        missing.append(f"{spec.router.scoring} scoring")
    if spec.router.select_on_logits:
        missing.append("selection on raw logits")
    if spec.router.renormalize_min:
        missing.append("renormalisation clamp")
    if spec.router.masked_experts and backend != "tvm":
        missing.append("masked (pruned) experts")
    if spec.experts.activation in ("gelu", "swiglu_softcap"):
        missing.append(f"{spec.experts.activation} activation")
    if spec.experts.shared_gated:
        missing.append("gated shared experts")
    if not spec.experts.gated:
        missing.append("non-gated experts")
    return missing
