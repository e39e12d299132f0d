"""Ahead-of-time compilation of the MoE kernels for a GPU arch, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` builds PTX and a
cubin for sm_<arch> on any machine. Triton does not check the result against the
target's shared-memory limit when compiling ahead of time, so this module does:
`check_config_fits` compiles the two grouped GEMMs (the only kernels whose shared memory
depends on the KernelConfig) for the profile's arch and compares `metadata.shared` with
`profile.max_shared_memory_per_block` (moecc.devices is the one source of that limit).
The tuning database uses it to prune candidate configurations per device.

Quantised expert stacks (int8 / int4 / fp8 weight-only, `weight_format` and
`group_size` as in ExpertSpec) compile the same two kernels with uint8 weight pointers
and fp32 scale pointers; `SHIPPED_WEIGHT_FORMATS` lists the formats whose heuristic
configurations CI compiles for every arch (tests/backends/test_triton_aot.py).

The kernels are compiled as `@triton.jit` would compile them at a launch: the constexprs
come from the same helpers the launch wrappers use, pointers carry the 16-byte
divisibility hint (torch allocations are aligned), integer arguments equal to 1 become
constants and multiples of 16 carry the divisibility hint. Strides assume the canonical
contiguous layout. The token count only changes integers that are not specialised, so
one compile per (config, shape, dtype, arch) stands for every T.

If the kernels were imported under the Triton interpreter (TRITON_INTERPRET=1 set
before their first import), they cannot be compiled in this process; the compilation
then runs in a child process without that variable (slower, same result).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import NamedTuple, Optional

from moecc.backends.triton.config import KernelConfig
from moecc.devices import DeviceProfile

DTYPE_TRITON = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
CONFIG_KERNELS = ("gate_up_act_kernel", "down_proj_kernel")


# (weight_format, group_size) of the formats moecc.precision ships defaults for: int8 per
# row (Int8WeightOnly), int4 groups 32 / 64 / 128 (Int4WeightOnly, default 128), fp8
# 128 x 128 blocks (Fp8BlockScaled); the group sizes are the ones that divide every
# reference shape's K and N.
SHIPPED_WEIGHT_FORMATS = (("int8", 0), ("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128), ("fp8", 128))


class FitResult(NamedTuple):
    fits: bool
    shared_bytes: int  # the largest metadata.shared over the compiled kernels
    reason: str


def _dtype_name(dtype) -> str:
    name = dtype if isinstance(dtype, str) else {"torch.float32": "fp32", "torch.float16": "fp16",
                                                  "torch.bfloat16": "bf16"}.get(str(dtype), str(dtype))
    if name not in DTYPE_TRITON:
        raise ValueError(f"AOT compilation supports dtypes {sorted(DTYPE_TRITON)}, got {dtype!r}")
    return name


def _jit_like(fn, values: dict, pointer_types: dict, constexprs: dict):
    """(signature, constexprs, attrs) as @triton.jit would specialise `fn` for these values."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(values[name], float):
            signature[name] = "fp32"
        elif values[name] == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i64" if abs(values[name]) >= 2**31 else "i32"
            if values[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def _scale_strides(fmt: str, group: int, rows: int, cols: int) -> tuple:
    """(expert stride, row stride) of the contiguous scales of a [rows, cols] stack (0, 0 dense)."""
    if fmt == "dense":
        return 0, 0
    if fmt == "fp8":
        grid_rows, grid_cols = -(-rows // group), -(-cols // group)
    else:
        grid_rows, grid_cols = rows, cols // (group or cols)
    return grid_rows * grid_cols, grid_cols


def _kernel_builds(config: KernelConfig, shape: tuple, dtype: str, activation: str, has_bias: bool,
                   num_shared: int, weight_format: str = "dense", group_size: int = 0) -> list:
    """[(kernel name, fn, values, pointer types, constexprs)] for the two grouped GEMMs.

    dtype: the compute dtype (quantised stacks: the hidden states' dtype; their weights are
    uint8 bytes, fp8 included, with fp32 scales: weight_formats.py)."""
    import torch

    from moecc.backends.triton import grouped_gemm as gg
    from moecc.spec import ExpertSpec

    e, n, k, top_k = shape
    stack, slots_per_token = e + num_shared, top_k + num_shared
    experts = ExpertSpec(hidden_size=k, intermediate_size=n, activation=activation, has_bias=has_bias,
                         num_shared=num_shared, shared_fused=num_shared > 0, weight_format=weight_format,
                         group_size=group_size)
    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    t = DTYPE_TRITON[dtype]
    pack = 2 if weight_format == "int4" else 1
    w_type, s_type = (t, t) if weight_format == "dense" else ("u8", "fp32")
    se1, sr1 = _scale_strides(weight_format, group_size, 2 * n, k)
    se2, sr2 = _scale_strides(weight_format, group_size, k, n)
    num_slots = 7 * slots_per_token + 1  # a token count that is not specialised
    max_blocks = num_slots + stack
    ints = {"num_slots": num_slots, "num_pid_m": max_blocks}
    gemm1 = dict(ints, N=n, K=k, alpha=1.702, limit=7.0, stride_xt=k, stride_we=2 * n * k // pack,
                 stride_wn=k // pack, stride_se=se1, stride_sr=sr1, stride_be=2 * n if has_bias else 0, stride_at=n)
    gemm2 = dict(ints, N=n, K=k, stride_at=n, stride_we=k * n // pack, stride_wk=n // pack, stride_se=se2,
                 stride_sr=sr2, stride_be=k if has_bias else 0, stride_ys=num_slots * k, stride_yt=k)
    y_type = "fp32" if config.split_k > 1 else t
    idx = {"sorted_ptr": "i32", "block_expert_ptr": "i32", "num_padded_ptr": "i32"}
    return [
        ("gate_up_act_kernel", gg.gate_up_act_kernel, gemm1,
         dict(idx, x_ptr=t, w_ptr=w_type, scale_ptr=s_type, bias_ptr=t, act_ptr=t),
         gg.gate_up_constexprs(config, experts, slots_per_token, tdtype)),
        ("down_proj_kernel", gg.down_proj_kernel, gemm2,
         dict(idx, act_ptr=t, w_ptr=w_type, scale_ptr=s_type, bias_ptr=t, y_ptr=y_type),
         gg.down_constexprs(config, experts, tdtype)),
    ]


def _support_builds(router, num_shared: int, hidden: int, dtype: str, block_m: int, split_k: int,
                    num_tokens: int) -> list:
    """Routing, alignment and combine kernels (independent of the GEMM tiles but for BLOCK_M)."""
    from moecc.backends.triton import align, combine, routing

    t = DTYPE_TRITON[dtype]
    e, slots = router.num_experts, router.top_k + num_shared
    num_slots = num_tokens * slots
    i32 = "i32"
    align_meta = align.align_constexprs(num_slots, e + num_shared, block_m)
    return [
        ("route_topk_kernel", routing.route_topk_kernel,
         dict(T=num_tokens, E=e, stride_lt=e, scaling=float(router.routed_scaling_factor),
              renorm_eps=float(router.renormalize_eps)),
         dict(logits_ptr="fp32", corr_bias_ptr="fp32", weights_ptr="fp32", ids_ptr=i32),
         routing.routing_constexprs(router, num_shared, router.has_correction_bias)),
        ("count_slots_kernel", align.count_slots_kernel, dict(num_slots=num_slots),
         dict(ids_ptr=i32, counts_ptr=i32), {"BLOCK": align_meta["BLOCK"]}),
        ("scatter_slots_kernel", align.scatter_slots_kernel, dict(num_slots=num_slots, num_experts=e + num_shared),
         dict(ids_ptr=i32, counts_ptr=i32, sorted_ptr=i32, block_expert_ptr=i32, num_padded_ptr=i32), align_meta),
        ("combine_slots_kernel", combine.combine_slots_kernel,
         dict(T=num_tokens, K=hidden, stride_yp=num_slots * hidden, stride_ys=hidden, stride_ot=hidden),
         dict(y_ptr="fp32" if split_k > 1 else t, w_ptr="fp32", out_ptr=t),
         combine.combine_constexprs(num_tokens, hidden, slots, split_k)),
    ]


def compile_support_kernels(router, hidden: int, dtype, arch: int, *, num_shared: int = 0, block_m: int = 16,
                            split_k: int = 1, num_tokens: int = 7) -> dict:
    """Compile routing, alignment and combine for sm_<arch> -> {kernel name: shared bytes}.

    A build check: these kernels' shared memory does not depend on the GEMM tiles.
    `router` is a RouterSpec.
    """
    import dataclasses

    request = ["support", dataclasses.asdict(router), int(num_shared), int(hidden), _dtype_name(dtype), int(block_m),
               int(split_k), int(num_tokens), int(arch)]
    return dict(_run_request(json.dumps(request)))


def _compile_builds(builds: list, arch: int, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    shared = {}
    for name, fn, values, ptypes, constexprs in builds:
        signature, consts, attrs = _jit_like(fn, values, ptypes, constexprs)
        src = ASTSource(fn, signature=signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        shared[name] = int(compiled.metadata.shared)
    return shared


def _interpreted() -> bool:
    from triton.runtime.jit import JITFunction

    from moecc.backends.triton.grouped_gemm import gate_up_act_kernel

    return not isinstance(gate_up_act_kernel, JITFunction)


def compile_gemm_kernels(config: KernelConfig, shape: tuple, dtype, arch: int, *, activation: str = "silu",
                         has_bias: bool = False, num_shared: int = 0, weight_format: str = "dense",
                         group_size: int = 0) -> dict:
    """Compile both grouped GEMMs for sm_<arch> -> {kernel name: shared memory bytes}.

    shape = (E, N, K, top_k); weight_format / group_size as ExpertSpec's (quantised: dtype
    is the compute dtype). Raises whatever Triton raises when a config cannot be built, and
    ValueError when config.block_k crosses the format's scale groups.
    """
    _check_format(config, shape, weight_format, group_size)
    request = ["gemm", config.to_dict(), [int(v) for v in shape], _dtype_name(dtype), int(arch), activation,
               bool(has_bias), int(num_shared), weight_format, int(group_size)]
    return dict(_run_request(json.dumps(request)))


def _check_format(config: KernelConfig, shape: tuple, weight_format: str, group_size: int) -> None:
    from moecc.backends.triton.weight_formats import block_k_reason
    from moecc.spec import ExpertSpec

    _, n, k, _ = shape
    experts = ExpertSpec(hidden_size=k, intermediate_size=n, weight_format=weight_format, group_size=group_size)
    why = block_k_reason(config.block_k, experts)
    if why:
        raise ValueError(f"{config}: {why}")


@functools.lru_cache(maxsize=1024)
def _run_request(request: str) -> tuple:
    """Compile what `request` (JSON) names, here or, under the interpreter, in a child process."""
    if not _interpreted():
        return tuple(_execute(json.loads(request)).items())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "moecc.backends.triton.aot", request], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile in a child process failed:\n{proc.stderr[-4000:]}")
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]).items())


def _execute(request: list) -> dict:
    kind, *args = request
    if kind == "gemm":
        cfg, shape, dtype, arch, activation, has_bias, num_shared, weight_format, group_size = args
        config = KernelConfig.from_dict(cfg)
        builds = _kernel_builds(config, tuple(shape), dtype, activation, has_bias, num_shared, weight_format,
                                group_size)
        return _compile_builds(builds, arch, config.num_warps, config.num_stages)
    if kind == "support":
        from moecc.spec import RouterSpec

        router, num_shared, hidden, dtype, block_m, split_k, num_tokens, arch = args
        builds = _support_builds(RouterSpec(**router), num_shared, hidden, dtype, block_m, split_k, num_tokens)
        return _compile_builds(builds, arch, num_warps=4, num_stages=2)
    raise ValueError(f"unknown AOT request {kind!r}")


def check_config_fits(config: KernelConfig, shape: tuple, dtype, profile: DeviceProfile, *,
                      activation: str = "silu", has_bias: bool = False, num_shared: int = 0,
                      weight_format: str = "dense", group_size: int = 0) -> FitResult:
    """Whether `config` builds for `profile`'s arch within its shared memory per block
    (for a quantised format: and keeps each BLOCK_K step inside one scale group)."""
    limit = profile.max_shared_memory_per_block
    try:
        shared = compile_gemm_kernels(config, shape, dtype, profile.arch, activation=activation,
                                      has_bias=has_bias, num_shared=num_shared, weight_format=weight_format,
                                      group_size=group_size)
    except Exception as exc:  # noqa: BLE001 - a config that does not build does not fit
        return FitResult(False, 0, f"does not compile for sm_{profile.arch}: {type(exc).__name__}: {exc}")
    worst = max(shared, key=shared.get)
    used = shared[worst]
    if used > limit:
        return FitResult(False, used, f"{worst} needs {used} B of shared memory; {profile.name} "
                                      f"(sm_{profile.arch}) allows {limit} B per block")
    return FitResult(True, used, f"max shared memory {used} B ({worst}) within {limit} B on {profile.name}")


def shipped_configs(profile: Optional[DeviceProfile] = None, dtypes=("bf16", "fp16"), weight_format: str = "dense",
                    group_size: int = 0) -> list:
    """[(shape, dtype, num_tokens, config)]: the heuristic configs for the reference shapes
    and token counts (moecc.shapes) on `profile`; what runs when no tuning table exists
    (quantised formats: always, BLOCK_K limited to the scale group as moe.resolve_config does)."""
    from moecc.backends.triton.heuristics import heuristic_config
    from moecc.backends.triton.weight_formats import NO_LIMIT, max_block_k
    from moecc.shapes import REFERENCE_SHAPES, REFERENCE_TOKEN_COUNTS
    from moecc.spec import ExpertSpec

    out = []
    for s in REFERENCE_SHAPES:
        shape = (s.num_experts, s.intermediate_size, s.hidden_size, s.top_k)
        experts = ExpertSpec(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                             weight_format=weight_format, group_size=group_size)
        limit = max_block_k(experts)
        for dtype in dtypes:
            for t in REFERENCE_TOKEN_COUNTS:
                config = heuristic_config(*shape, t, dtype, profile,
                                          max_block_k=None if limit == NO_LIMIT else limit)
                out.append((shape, dtype, t, config))
    return out


if __name__ == "__main__":  # child-process entry used when the parent runs the interpreter
    print(json.dumps(_execute(json.loads(sys.argv[1]))))
