"""Linear layers on the TVM (llvm) MoE kernels: one expert, top-1.

Packed int8 / int4 weights (`quantized_linear`), and one-row dense GEMVs (`dense_gemv`,
the MoE op's router at decode sizes). For the packed ones:

    y [T, N] = x [T, K] @ dequant(packed [N, K/P], scales [N, K/G])^T + bias

The MoE down GEMM (`moe_down_weighted`, kernels_llvm_quantized.py / kernels_llvm_vnni.py)
computes y[b, m, :] = (a[b, m] @ W[e]^T + bias[e]) * row_weight[b, m] for blocks of rows
of expert e. With one expert (E = 1, W = the linear's weight, its intermediate size N :=
the linear's K and its hidden size K := the linear's N), every token a block of one row
and row weight 1, that is the linear layer, with the same packed layout, the same
dequantisation or integer dot products, and the same measured schedules. The module
built for this key also holds the gate/up and combine kernels, unused here. Semantics:
moecc/quantized_linear.reference_linear; tested against it.
"""

from __future__ import annotations

import functools

import torch

from moecc.backends.tvm.op import int4_ordered, int8_buffers, kernel_key
from moecc.backends.tvm.runtime import aligned, device_key, target_for, use_torch_thread_count


def _layer_spec(n_out: int, k_in: int, fmt: str, group_size: int, activations: str):
    from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec

    return MoELayerSpec(RouterSpec(1, 1), ExpertSpec(n_out, k_in, weight_format=fmt, group_size=group_size,
                                                     activations=activations))


@functools.lru_cache(maxsize=1024)
def _key(dtype: torch.dtype, n_out: int, k_in: int, fmt: str, group_size: int, activations: str, rows: int,
         has_bias: bool):
    target = target_for("cpu")
    key, _ = kernel_key(_layer_spec(n_out, k_in, fmt, group_size, activations), dtype, target, _config(rows, fmt), rows,
                        False, has_bias, device_key(target))
    return key


def _config(rows: int, fmt: str = "int8") -> dict:
    """The down GEMM's schedule for a linear of `rows` rows. The MoE defaults assume rows
    spread over many experts; here every row meets the one weight: decode (a few rows)
    takes the MoE decode schedule (one row per block, 4 output rows per task, prefetch
    2 KiB ahead; with int8 activations op.fit_groups sets 2 rows and 4 KiB, measured there),
    more rows share each weight tile in blocks of 4 (not measured)."""
    if rows <= 2 and fmt == "dense":
        # Measured (2-core Xeon, 2026-12-03, bf16 weights cycled from DRAM): [128 x 2048]
        # 23 us (2 rows per task, 4 KiB ahead) vs 25 (4 rows, 2 KiB), torch F.linear 38;
        # [4096 x 2048] 634 vs 670 us, torch.mv 681.
        return {"block_m": 1, "tile_n": 1, "tile_k": 2, "vec": 16, "prefetch": 4096}
    if rows <= 2:
        return {"block_m": 1, "tile_n": 1, "tile_k": 4, "vec": 16, "prefetch": 2048}
    return {"block_m": 4, "tile_n": 1, "tile_k": 2, "vec": 16, "prefetch": 0}


@functools.lru_cache(maxsize=1024)
def tvm_linear_unfit(dtype: torch.dtype, n_out: int, k_in: int, fmt: str, group_size: int, activations: str) -> str:
    """Why the TVM kernels cannot run this linear on this machine ('' when they can)."""
    import importlib.util

    if importlib.util.find_spec("tvm") is None:
        return "apache-tvm is not installed"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"input dtype {dtype}"
    if activations == "int8":
        from moecc.backends.tvm.build import host_has_vnni

        if not host_has_vnni():
            return "this CPU has no AVX512-VNNI"
    try:
        _key(dtype, n_out, k_in, fmt, group_size, activations, 1, False)
    except (ValueError, AssertionError) as exc:
        return str(exc)
    return ""


def quantized_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                     fmt: str, group_size: int, activations: str) -> torch.Tensor:
    """x [T, K] (CPU) -> [T, N] in x's dtype."""
    from moecc.backends.tvm.cache import load_kernels

    t, k_in = x.shape
    n_out = packed.shape[0]
    key = _key(x.dtype, n_out, k_in, fmt, group_size, activations, t, bias is not None)
    use_torch_thread_count()
    kernels = load_kernels(key)
    bm = key.config.block_m
    nb = -(-t // bm)  # blocks of bm rows; the last one padded with zeros (row weight 0)
    dev = x.device
    rows = x.float() if nb * bm == t else torch.cat([x.float(), x.new_zeros(nb * bm - t, k_in, dtype=torch.float32)])
    row_weight, experts, block_ptr, zero_bias = _constants(nb, bm, n_out, x.dtype, dev)
    w = aligned(packed.contiguous()).view(1, n_out, -1)  # [E = 1, N, K/P]
    s = aligned(scales.float().contiguous()).view(1, n_out, -1)  # [1, N, K/G]
    b = aligned(bias.to(x.dtype).contiguous()).view(1, n_out) if bias is not None else zero_bias  # [1, N]
    y = torch.empty(nb, bm, n_out, dtype=torch.float32, device=dev)  # [NB, BM, N]
    if fmt == "int4":  # the kernels read columns in nibble order (kernels_llvm_quantized.py)
        rows = int4_ordered(rows, 4 * key.config.vec if activations == "int8" else key.config.vec)
    if activations == "int8":
        aq, a_s, az = int8_buffers(nb * bm, k_in, key, dev)
        kernels.quantize_act(aligned(rows.contiguous()), aq, a_s, az)  # rows already in the kernels' order
        kernels.down_weighted(aq.view(nb, bm, k_in), a_s.view(nb, bm, -1), az.view(nb, bm, *az.shape[1:]),
                              row_weight, experts, block_ptr, w, s, b, y)
    else:
        kernels.down_weighted(aligned(rows.contiguous()).view(nb, bm, k_in), row_weight, experts, block_ptr, w, s, b, y)
    return y.view(nb * bm, n_out)[:t].to(x.dtype)


@functools.lru_cache(maxsize=256)
def _constants(nb: int, bm: int, n_out: int, dtype: torch.dtype, device: torch.device):
    """The kernels' read-only routing inputs for one expert, made once per shape (each
    fresh small tensor costs microseconds, and a decode step calls this ~20 times):
    row weights 1 [NB, BM], experts [0], block_ptr [0, NB], a zero bias [1, N]."""
    return (torch.ones(nb, bm, dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device),
            torch.tensor([0, nb], dtype=torch.int32, device=device),
            torch.zeros(1, n_out, dtype=dtype, device=device))


def dense_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K] (CPU, T <= 2) @ weight [N, K]^T -> [T, N] fp32, weight in its own dtype
    (fp32 / bf16 / fp16) widened in registers, fp32 accumulation.

    The down GEMM with one expert (module docstring) on dense weights. Callers round the
    result to the dtype their semantics name (the router: moe_layer's `_router_logits`).
    """
    from moecc.backends.tvm.cache import load_kernels

    t, k_in = x.shape
    n_out = weight.shape[0]
    key = _key(weight.dtype, n_out, k_in, "dense", 0, "float", t, False)
    use_torch_thread_count()
    kernels = load_kernels(key)
    row_weight, experts, block_ptr, zero_bias = _constants(t, 1, n_out, weight.dtype, x.device)
    y = torch.empty(t, 1, n_out, dtype=torch.float32, device=x.device)  # [T, BM = 1, N]
    kernels.down_weighted(aligned(x.float().contiguous()).view(t, 1, k_in), row_weight, experts, block_ptr,
                          aligned(weight.contiguous()).view(1, n_out, k_in), zero_bias, y)
    return y.view(t, n_out)
