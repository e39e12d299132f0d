"""The MoE layers being compared, all with one calling convention: `layer(hidden) -> out`.

Every implementation includes routing (router matmul + top-k selection) in what it runs,
takes hidden [T, K] and returns [T, K] in hidden's dtype.

    reference            moecc.backends.reference.moe_layer (the ground truth; slow)
    loop                 the shape of transformers' "eager" experts: one_hot mask, nonzero
                         over experts hit, two linears per expert, index_add_ in the
                         activation dtype. Synchronises with the host: eager only.
    grouped_mm           transformers' default "grouped_mm" experts: sort the (token,
                         expert) pairs by expert, histc + cumsum -> offsets,
                         torch._grouped_mm for gate_up, activation, torch._grouped_mm for
                         down, weighted sum. No host synchronisation: CUDA-graph safe.
    inductor_grouped_mm  the grouped_mm path through torch.compile's default backend
                         (fullgraph, automatic dynamic token count).
    moecc_triton         moecc.backends.triton.moe_layer(hidden, weights, spec).

`build(name, weights, spec)` returns a `Layer`, or raises `Unavailable` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from moecc.backends.reference.experts import CanonicalExperts, activation, canonical_expert_weights
from moecc.backends.reference.routing import route, router_logits
from moecc.spec import MoELayerSpec
from moecc.weights import MoEWeights

IMPLEMENTATIONS = ("reference", "loop", "grouped_mm", "inductor_grouped_mm", "moecc_triton")
GPU_DEFAULT = ("moecc_triton", "loop", "grouped_mm", "inductor_grouped_mm")
CPU_DEFAULT = ("reference", "loop", "grouped_mm")


class Unavailable(RuntimeError):
    """This implementation cannot run here (missing module, unsupported device)."""


@dataclass
class Layer:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]  # hidden [T, K] -> [T, K]
    graph_safe: bool  # no host synchronisation: may be captured in a CUDA graph
    note: str = ""
    prepare: Optional[Callable[[torch.Tensor], None]] = None  # once per new input, before warm-up

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fn(hidden)


# --- grouped matmul primitive -------------------------------------------------------------

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _torch_grouped_mm() -> Optional[GroupedMM]:
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return None if fn is None else (lambda x, w, offs: fn(x, w, offs=offs))


def grouped_mm_fallback(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, K] sorted by group, w [G, K, N], offs [G] cumulative ends -> [S, N]; one mm per group.

    The same computation as transformers' `grouped_mm_fallback`; reads offs on the host.
    """
    out = x.new_zeros(x.shape[0], w.shape[2])  # [S, N]
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


def select_grouped_mm(device: torch.device, dtype: torch.dtype) -> tuple[GroupedMM, str]:
    """torch's grouped matmul if it runs for (device, dtype), else the per-group fallback.

    Probed on a tiny problem rather than guessed from versions: support depends on the
    torch build, the device (sm_80+ on CUDA) and the dtype (some builds: bf16 only).
    """
    fn = _torch_grouped_mm()
    if fn is not None:
        try:
            # The layout of the real call: weights [G, N, K] seen through a transpose.
            x = torch.ones(4, 32, device=device, dtype=dtype)  # [S, K]
            w = torch.ones(2, 16, 32, device=device, dtype=dtype).transpose(1, 2)  # [G, K, N]
            y = fn(x, w, torch.tensor([1, 4], device=device, dtype=torch.int32))  # [S, N]
            if y.shape == (4, 16) and bool(torch.all(y == 32)):
                return fn, ""
            reason = "returned a wrong result on a probe"
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    else:
        reason = "not in this torch"
    note = (f"torch._grouped_mm unavailable for {dtype} on {device.type} ({reason}); "
            "using the per-group torch.mm fallback (host sync, not CUDA-graph safe)")
    return grouped_mm_fallback, note


# --- the baselines as plain functions -----------------------------------------------------


def _routing(hidden, weights: MoEWeights, spec: MoELayerSpec):
    logits = router_logits(hidden, weights.router_weight, weights.router_bias, spec.router)  # [T, E]
    return route(logits, spec.router, weights.correction_bias)  # [T, k] fp32, [T, k] int64


def _shared(hidden, experts: CanonicalExperts, spec: MoELayerSpec) -> torch.Tensor:
    """Sum of the always-active (shared) experts' outputs, fp32 [T, K] (0 when none)."""
    n, e0, out = spec.experts.intermediate_size, spec.router.num_experts, 0
    for s in range(experts.num_shared):
        h = torch.nn.functional.linear(hidden, experts.gate_up[e0 + s])  # [T, 2N]
        out = out + torch.nn.functional.linear(activation(h[:, :n], h[:, n:], spec.experts),
                                               experts.down[e0 + s]).float()  # [T, K]
    return out


def per_expert_loop(hidden: torch.Tensor, weights: MoEWeights, experts: CanonicalExperts,
                    spec: MoELayerSpec) -> torch.Tensor:
    """transformers' eager experts loop; hidden [T, K] -> [T, K]."""
    e, n = spec.router.num_experts, spec.experts.intermediate_size
    topk_w, topk_ids = _routing(hidden, weights, spec)  # [T, k]
    topk_w = topk_w.to(hidden.dtype)  # transformers' routers hand bf16 weights to the experts
    out = torch.zeros_like(hidden)  # [T, K], accumulated in the activation dtype
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(topk_ids, num_classes=e).permute(2, 1, 0)  # [E, k, T]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()  # [U, 1]; host sync
    for (idx,) in hit.tolist():
        slot, tok = torch.where(mask[idx])  # [t_e]
        h = torch.nn.functional.linear(hidden[tok], experts.gate_up[idx], _row(experts.gate_up_bias, idx))
        a = activation(h[:, :n], h[:, n:], spec.experts)  # [t_e, N]
        y = torch.nn.functional.linear(a, experts.down[idx], _row(experts.down_bias, idx))  # [t_e, K]
        out.index_add_(0, tok, (y * topk_w[tok, slot, None]).to(out.dtype))
    if experts.num_shared:
        out = (out.float() + _shared(hidden, experts, spec)).to(hidden.dtype)
    return out


def grouped_mm_path(hidden: torch.Tensor, weights: MoEWeights, experts: CanonicalExperts,
                    spec: MoELayerSpec, grouped_mm: GroupedMM) -> torch.Tensor:
    """transformers' grouped_mm experts path; hidden [T, K] -> [T, K]."""
    t, kdim = hidden.shape
    e, top_k, n = spec.router.num_experts, spec.router.top_k, spec.experts.intermediate_size
    topk_w, topk_ids = _routing(hidden, weights, spec)  # [T, k]
    ids_sorted, perm = torch.sort(topk_ids.reshape(-1))  # [S], S = T * k
    x = hidden[perm // top_k]  # [S, K], grouped by expert
    w = topk_w.to(hidden.dtype).reshape(-1)[perm]  # [S]; transformers' routers return bf16 weights
    # histc, not bincount: no host sync. CUDA wants an int input, CPU a float one.
    hist_in = ids_sorted.int() if hidden.device.type == "cuda" else ids_sorted.float()
    counts = torch.histc(hist_in, bins=e, min=0, max=e - 1)  # [E]
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E] cumulative ends
    gate_up = experts.gate_up[:e].transpose(1, 2)  # [E, K, 2N] view
    h = grouped_mm(x.to(gate_up.dtype), gate_up, offs)  # [S, 2N]
    if experts.gate_up_bias is not None:
        h = h + experts.gate_up_bias[ids_sorted]
    a = activation(h[:, :n], h[:, n:], spec.experts)  # [S, N]
    down = experts.down[:e].transpose(1, 2)  # [E, N, K] view
    y = grouped_mm(a, down, offs)  # [S, K]
    if experts.down_bias is not None:
        y = y + experts.down_bias[ids_sorted]
    y = y * w.unsqueeze(-1)  # [S, K]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    out = y[inv].view(t, top_k, kdim).sum(dim=1)  # [T, K]; sum accumulates in fp32 internally
    if experts.num_shared:
        out = out.float() + _shared(hidden, experts, spec)
    return out.to(hidden.dtype)


def _row(t, i):
    return None if t is None else t[i]


# --- factory ------------------------------------------------------------------------------


def build(name: str, weights: MoEWeights, spec: MoELayerSpec) -> Layer:
    """The implementation `name` bound to these weights (layout conversion happens here,
    outside anything timed)."""
    if name == "reference":
        from moecc.backends.reference import moe_layer

        return Layer(name, lambda h: moe_layer(h, weights, spec), graph_safe=False,
                     note="plain torch; unique/nonzero sync with the host")
    experts = canonical_expert_weights(weights, spec.experts)
    device, dtype = weights.gate_up.device, weights.gate_up.dtype
    if name == "loop":
        return Layer(name, lambda h: per_expert_loop(h, weights, experts, spec), graph_safe=False,
                     note="nonzero + per-expert launches: host sync, not CUDA-graph capturable")
    if name == "grouped_mm":
        mm, note = select_grouped_mm(device, dtype)
        return Layer(name, lambda h: grouped_mm_path(h, weights, experts, spec, mm),
                     graph_safe=mm is not grouped_mm_fallback, note=note)
    if name == "inductor_grouped_mm":
        return _inductor(weights, experts, spec)
    if name == "moecc_triton":
        return _moecc_triton(weights, spec)
    raise ValueError(f"unknown implementation {name!r}; known: {IMPLEMENTATIONS}")


def _inductor(weights: MoEWeights, experts: CanonicalExperts, spec: MoELayerSpec) -> Layer:
    mm, note = select_grouped_mm(weights.gate_up.device, weights.gate_up.dtype)
    if mm is grouped_mm_fallback:
        raise Unavailable(note)
    if weights.gate_up.dtype != torch.bfloat16:  # as transformers decides under compile
        raise Unavailable("torch._grouped_mm under torch.compile takes bf16 only (transformers "
                          "switches to its per-expert custom op there)")
    # Dynamo keys compiled code by the function's code object, shared across shapes; start
    # clean so earlier shapes do not use up its recompile limit. Clears compiled code only.
    torch._dynamo.reset()
    compiled = torch.compile(grouped_mm_path, fullgraph=True)

    def prepare(hidden: torch.Tensor) -> None:
        if hidden.shape[0] > 1:  # one graph for all T > 1 (T == 1 is always specialised)
            torch._dynamo.maybe_mark_dynamic(hidden, 0)

    return Layer("inductor_grouped_mm", lambda h: compiled(h, weights, experts, spec, mm),
                 graph_safe=True, note="torch.compile default backend, fullgraph, dynamic T",
                 prepare=prepare)


def _moecc_triton(weights: MoEWeights, spec: MoELayerSpec) -> Layer:
    device = weights.gate_up.device
    try:
        from moecc.backends import triton as moecc_triton
        from moecc.backends.triton import moe_layer
    except ImportError as exc:
        raise Unavailable(f"moecc.backends.triton.moe_layer not importable: {exc}") from exc
    if not moecc_triton.is_available(device):
        raise Unavailable(f"moecc Triton kernels cannot run on {device.type} here (a CUDA device, or "
                          "TRITON_INTERPRET=1 on a CPU, is needed)")
    return Layer("moecc_triton", lambda h: moe_layer(h, weights, spec), graph_safe=device.type == "cuda",
                 note="" if device.type == "cuda" else "Triton interpreter (functional check only)")
