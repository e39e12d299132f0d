"""Reference expert math: layouts, activations and one expert's SwiGLU MLP.

`canonical_expert_weights` turns any source layout the capture accepts into the layout
the kernels take (ExpertSpec.canonical): gate_up [E', 2N, K] with gate rows first,
down [E', K, N], shared experts appended as experts E .. E+S-1 (E' = E + S). The
expert-fusion pass calls the same function at compile time, so there is one definition.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from moecc.spec import ExpertSpec
from moecc.weights import MoEWeights


class CanonicalExperts(NamedTuple):
    gate_up: torch.Tensor  # [E', 2N, K]
    down: torch.Tensor  # [E', K, N]
    gate_up_bias: Optional[torch.Tensor]  # [E', 2N]
    down_bias: Optional[torch.Tensor]  # [E', K]
    num_shared: int  # S: the last S experts are always active with weight 1


def activation(gate: torch.Tensor, up: Optional[torch.Tensor], spec: ExpertSpec) -> torch.Tensor:
    """act(gate) * up for the layer's activation; [t, N] x [t, N] -> [t, N].
    Non-gated experts (up is None): act(x) of the one projection."""
    if not spec.gated:
        if spec.activation == "relu2":
            return torch.square(torch.relu(gate))
        if spec.activation == "silu":
            return torch.nn.functional.silu(gate)
        return torch.nn.functional.gelu(gate, approximate="tanh" if spec.activation == "gelu_tanh" else "none")
    if spec.activation == "silu":
        return torch.nn.functional.silu(gate) * up
    if spec.activation == "gelu_tanh":
        return torch.nn.functional.gelu(gate, approximate="tanh") * up
    if spec.activation == "gelu":
        return torch.nn.functional.gelu(gate) * up
    if spec.activation == "swiglu_softcap":  # Inkling2: softcaps bound the linear factors, in fp32
        g, u = gate.float(), up.float()
        capped_g = spec.gate_softcap * torch.tanh(g / spec.gate_softcap)
        capped_u = spec.up_softcap * torch.tanh(u / spec.up_softcap)
        return (capped_g * torch.sigmoid(g) * capped_u).to(gate.dtype)
    if spec.activation == "swiglu_oai":  # GPT-OSS: clamped, alpha-scaled, (up + 1)
        gate = gate.clamp(max=spec.swiglu_limit)
        up = up.clamp(min=-spec.swiglu_limit, max=spec.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * spec.swiglu_alpha))
    raise ValueError(f"unknown activation {spec.activation!r}")


def canonical_expert_weights(w: MoEWeights, spec: ExpertSpec) -> CanonicalExperts:
    """Any accepted source layout -> canonical tensors (copies only where layout differs)."""
    n = spec.intermediate_size
    if spec.gate_up_layout == "separate":
        gate, up = w.gate_up, w.up
        if spec.gate_up_transposed:  # [E, K, N] -> [E, N, K]
            gate, up = gate.transpose(1, 2), up.transpose(1, 2)
        gate_up = torch.cat([gate, up], dim=1)  # [E, 2N, K]
    else:
        gate_up = w.gate_up.transpose(1, 2) if spec.gate_up_transposed else w.gate_up  # [E, 2N, K]
        if spec.gate_up_layout == "interleaved":
            gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
    gate_up_bias = w.gate_up_bias
    if gate_up_bias is not None and spec.gate_up_layout == "interleaved":
        gate_up_bias = torch.cat([gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]], dim=1)
    down = w.down.transpose(1, 2) if spec.down_transposed else w.down  # [E, K, N]
    down_bias = w.down_bias

    num_shared = spec.num_shared
    if num_shared and not spec.shared_fused:
        # A dense MLP of width S*N is the sum of S experts of width N (split the
        # intermediate dimension): append them as always-active experts.
        k = spec.hidden_size
        shared_gate, shared_up = w.shared_gate, w.shared_up
        if not spec.gated:  # one projection; stands in for "up" only to share the padding code
            shared_up = shared_gate
        if spec.shared_gate_up_fused:  # one [2*S*N, K] Linear, gate rows first
            shared_gate, shared_up = w.shared_gate.chunk(2, dim=0)
        shared_down = w.shared_down
        pad = num_shared * n - shared_gate.shape[0]
        if pad:  # width Ns < S*N: zero channels meet zero down columns, so the sum is unchanged
            shared_gate = torch.nn.functional.pad(shared_gate, (0, 0, 0, pad))
            shared_up = torch.nn.functional.pad(shared_up, (0, 0, 0, pad))
            shared_down = torch.nn.functional.pad(shared_down, (0, pad))
        sg = shared_gate.reshape(num_shared, n, k)
        su = shared_up.reshape(num_shared, n, k)
        sd = shared_down.reshape(k, num_shared, n).transpose(0, 1)  # [S, K, N]
        shared_rows = torch.cat([sg, su], dim=1) if spec.gated else sg  # [S, 2N, K] or [S, N, K]
        gate_up = torch.cat([gate_up, shared_rows.to(gate_up.dtype)], dim=0)
        down = torch.cat([down, sd.to(down.dtype)], dim=0)
        if gate_up_bias is not None:
            gate_up_bias = torch.cat([gate_up_bias, gate_up_bias.new_zeros(num_shared, 2 * n)])
        if down_bias is not None:
            down_bias = torch.cat([down_bias, down_bias.new_zeros(num_shared, k)])
    return CanonicalExperts(gate_up.contiguous(), down.contiguous(), gate_up_bias, down_bias, num_shared)


def expert_mlp(
    x: torch.Tensor,  # [t, K]
    gate_up: torch.Tensor,  # [2N, K] ([N, K] for non-gated experts)
    down: torch.Tensor,  # [K, N]
    gate_up_bias: Optional[torch.Tensor],  # [2N]
    down_bias: Optional[torch.Tensor],  # [K]
    spec: ExpertSpec,
) -> torch.Tensor:
    """One expert's gated MLP in the weights' dtype -> [t, K].

    spec.activations "int8": x and the activated rows are fake-quantised (per row and
    weight group, backends/reference/quantized.py) before their GEMMs, which then run in
    fp32 on the (dequantised) weights: the values the integer kernels compute exactly.
    """
    n = spec.intermediate_size
    if spec.activations == "int8":
        from moecc.backends.reference.quantized import fake_quantize_activations

        x = fake_quantize_activations(x, spec.group_size)  # [t, K] fp32
        h = torch.nn.functional.linear(x, gate_up.float(), None if gate_up_bias is None else gate_up_bias.float())
        a = activation(h[:, :n], h[:, n:] if spec.gated else None, spec)  # [t, N] fp32
        a = fake_quantize_activations(a, spec.group_size)
        out = torch.nn.functional.linear(a, down.float(), None if down_bias is None else down_bias.float())
        return out.to(gate_up.dtype)  # [t, K]
    h = torch.nn.functional.linear(x.to(gate_up.dtype), gate_up, gate_up_bias)  # [t, 2N] ([t, N] if not gated)
    a = activation(h[:, :n], h[:, n:] if spec.gated else None, spec)  # [t, N]
    return torch.nn.functional.linear(a, down, down_bias)  # [t, K]
