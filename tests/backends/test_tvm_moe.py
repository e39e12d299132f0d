"""The TVM MoE op (llvm target) against the reference op, and the CUDA/export builds.

Numerics run on the CPU (target llvm) on fresh random inputs: one token, ragged token
counts, experts without tokens, top-1, every activation (silu, gelu_tanh, swiglu_oai
with biases and clamping), every router variant the op takes from the reference router
(softmax, sigmoid + groups + correction bias + scaling, GPT-OSS top-k softmax with router
bias), shared experts, fp32 and fp16. Tolerances: moecc.tolerances (fp32 rtol 1e-4 /
atol 1e-5; fp16 1e-2 / 1e-3, against the fp32 math of the kernel: see run_and_check), and
`check_close` fails on NaN or inf.
CUDA: sources and cubins are built for sm_90, sm_89 and sm_86 without a GPU.
Shapes are small (K=64, N=32) and most tests share one kernel config, so the session
compiles a handful of modules into a per-session cache folder.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import layer_factory
import pytest
import torch

tvm = pytest.importorskip("tvm")

from moecc.backends import reference  # noqa: E402
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec  # noqa: E402
from moecc.tolerances import check_close, tolerance  # noqa: E402
from moecc.weights import make_weights  # noqa: E402

pytestmark = pytest.mark.tvm

REPO = Path(__file__).resolve().parents[2]
CFG = {"block_m": 4, "tile_n": 2, "tile_k": 2, "vec": 16, "red_tile": 32}  # one module per layer kind
DEEPSEEK = RouterSpec(16, 4, "sigmoid", n_group=4, topk_group=2, has_correction_bias=True, renormalize=True,
                      renormalize_eps=1e-20, routed_scaling_factor=2.5)
GPT_OSS = RouterSpec(8, 2, "topk_softmax", has_router_bias=True)


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(fresh_tvm_cache):
    """A fresh on-disk TVM module cache for this test module (tests/backends/conftest.py)."""


make_layer = layer_factory.make_layer


def run_and_check(spec, weights, t, config=CFG, x=None):
    """The op's output against the reference's, with the dtype's tolerance.

    fp16: the TVM kernels keep every intermediate in fp32 (only inputs and the output
    are fp16), while the reference rounds the gate/up projections and the activation to
    fp16. The reference run in fp32 on the same fp16 inputs is the exact math of the
    kernel, so it is the reference compared at fp16 tolerance; the fp16 reference must
    still agree within twice that tolerance.
    """
    from moecc.backends.tvm import moe_layer

    dtype = weights.gate_up.dtype
    x = layer_factory.tie_free_hidden(spec, weights, t, dtype) if x is None else x
    out = moe_layer(x, weights, spec, config)
    ref = reference.moe_layer(x, weights, spec)
    assert out.shape == ref.shape and out.dtype == x.dtype
    if dtype == torch.float32:
        check_close(out, ref, dtype)
        return out
    w32 = weights._replace(**{f: getattr(weights, f).float() for f in weights._fields
                              if getattr(weights, f) is not None})
    check_close(out, reference.moe_layer(x.float(), w32, spec).to(dtype), dtype)
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * rtol, atol=2 * atol)
    return out


# ---- availability and laziness -------------------------------------------------------

def test_import_is_lazy():
    code = "import sys, moecc.backends.tvm; assert 'tvm' not in sys.modules, 'tvm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_is_available():
    from moecc.backends.tvm import is_available

    assert is_available("cpu")
    assert not is_available("meta")
    assert is_available("cuda") == (torch.cuda.is_available() and tvm.cuda(0).exist)


def test_rejects_non_canonical_layout():
    from moecc.backends.tvm import moe_layer

    spec, w = make_layer(RouterSpec(8, 2))
    spec = spec.replace(experts={"down_transposed": True})
    with pytest.raises(ValueError, match="canonical"):
        moe_layer(torch.randn(2, 64), w, spec)


def test_config_fitting_keeps_accumulators_on_the_stack():
    from moecc.backends.tvm.config import LLVM_ACC_LIMIT, TVMKernelConfig, default_config

    for cfg in (TVMKernelConfig(block_m=8, tile_n=8, tile_k=8, vec=16), default_config("llvm", 4096, 8, 2)):
        f = cfg.fitted("llvm", n=768, k=2048)
        assert f.block_m * f.tile_n * f.vec < LLVM_ACC_LIMIT and f.block_m * f.tile_k * f.vec < LLVM_ACC_LIMIT
        assert 768 % f.tile_n == 0 and 2048 % f.tile_k == 0 and 768 % f.vec == 0
    f = TVMKernelConfig(tile_n=64, tile_k=64, red_tile=32).fitted("cuda", n=48, k=96)
    assert (f.tile_n, f.tile_k, f.red_tile) == (48, 48, 24)  # largest divisors <= the asked tiles
    with pytest.raises(ValueError, match="unknown TVM kernel config"):
        TVMKernelConfig.from_dict({"block_m": 4, "warps": 2})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_software_prefetch_keeps_results(dtype):
    """Prefetching past a row's end (into the next row or past the stack) changes nothing."""
    spec, w = make_layer(RouterSpec(8, 2), dtype=dtype)
    run_and_check(spec, w, 7, config={**CFG, "block_m": 1, "prefetch": 48})


def test_default_config_decode_uses_single_row_blocks():
    """Decode (far fewer rows than experts) must not pad every expert's one row to block_m 2."""
    from moecc.backends.tvm.config import default_config

    assert default_config("llvm", 1, 128, 8).block_m == 1  # 1 token x top-8 over 128 experts
    assert default_config("llvm", 64, 128, 8).block_m == 2  # 4 rows per expert
    assert default_config("llvm", 4096, 128, 8).block_m == 8


def test_zero_tokens():
    from moecc.backends.tvm import moe_layer

    spec, w = make_layer(RouterSpec(8, 2))
    assert moe_layer(torch.empty(0, 64), w, spec, CFG).shape == (0, 64)


# ---- numerics against the reference (llvm) ---------------------------------------------

@pytest.mark.parametrize("t", [1, 2, 7, 37])
def test_token_counts_softmax_silu(t):
    torch.manual_seed(t)
    spec, w = make_layer(RouterSpec(8, 2, renormalize=True))
    run_and_check(spec, w, t)


def test_one_module_serves_every_token_count():
    """T and the number of expert blocks are symbolic: no recompilation for a new T."""
    from moecc.backends.tvm.cache import load_kernels

    spec, w = make_layer(RouterSpec(8, 2, renormalize=True))
    run_and_check(spec, w, 3)
    before = load_kernels.cache_info()
    for t in (5, 19, 64):
        run_and_check(spec, w, t)
    after = load_kernels.cache_info()
    assert after.misses == before.misses and after.currsize == before.currsize


def test_experts_without_tokens_and_all_tokens_on_one_expert():
    torch.manual_seed(1)
    spec, w = make_layer(RouterSpec(16, 2))
    run_and_check(spec, w, 1)  # 14 of 16 experts idle
    rw = torch.zeros_like(w.router_weight)
    rw[5] = 1.0  # positive inputs -> expert 5 always wins
    w = w._replace(router_weight=rw)
    run_and_check(spec, w, 9, x=torch.rand(9, 64) + 0.1)  # 9 rows on one expert: several blocks


def test_top1():
    torch.manual_seed(2)
    spec, w = make_layer(RouterSpec(8, 1))
    run_and_check(spec, w, 11)


def test_gelu_tanh():
    torch.manual_seed(3)
    spec, w = make_layer(RouterSpec(8, 2), activation="gelu_tanh")
    run_and_check(spec, w, 13)


def test_gpt_oss_swiglu_biases_and_router_bias():
    torch.manual_seed(4)
    spec, w = make_layer(GPT_OSS, activation="swiglu_oai", bias=True, swiglu_limit=0.5)  # clamps bite
    run_and_check(spec, w, 17)


def test_deepseek_router_with_shared_experts():
    torch.manual_seed(5)
    spec, w = make_layer(DEEPSEEK, num_shared=2)
    run_and_check(spec, w, 10)


@pytest.mark.parametrize("cfg", [
    {"block_m": 1, "tile_n": 1, "tile_k": 1, "vec": 8},
    {"block_m": 8, "tile_n": 3, "tile_k": 5, "vec": 16},  # tiles not dividing N/K: fitted down
])
def test_other_configs(cfg):
    torch.manual_seed(6)
    spec, w = make_layer(RouterSpec(8, 2))
    run_and_check(spec, w, 21, config=cfg)


def test_default_config_from_tuning_lookup():
    torch.manual_seed(7)
    spec, w = make_layer(RouterSpec(8, 2))
    run_and_check(spec, w, 4, config=None)


@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
def test_fp16(activation):
    torch.manual_seed(8)
    spec, w = make_layer(GPT_OSS if activation == "swiglu_oai" else RouterSpec(8, 2), activation=activation,
                         bias=activation == "swiglu_oai", dtype=torch.float16)
    run_and_check(spec, w, 9)


def test_nan_in_an_active_expert_fails_the_check():
    from moecc.backends.tvm import moe_layer

    torch.manual_seed(9)
    spec, w = make_layer(RouterSpec(8, 2))
    x = torch.randn(3, 64)
    ids = reference.route(reference.router_logits(x, w.router_weight, None, spec.router), spec.router)[1]
    gate_up = w.gate_up.clone()
    gate_up[int(ids[0, 0]), 0, 0] = float("nan")
    w = w._replace(gate_up=gate_up)
    out = moe_layer(x, w, spec, CFG)
    assert torch.isnan(out[0]).any()
    with pytest.raises(AssertionError):
        check_close(out, reference.moe_layer(x, w, spec))


# ---- caches -------------------------------------------------------------------------------

def test_disk_cache_reused_across_processes_in_effect():
    from moecc.backends.tvm.cache import load_kernels

    spec, w = make_layer(RouterSpec(8, 2, renormalize=True))
    path = Path(run_and_check_path(spec, w))
    mtime = path.stat().st_mtime_ns
    load_kernels.cache_clear()  # as a new process would start
    assert run_and_check_path(spec, w) == str(path)
    assert path.stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert path.parent == Path(os.environ["MOECC_CACHE_DIR"]) / "tvm"
    assert not list(path.parent.glob("*.tmp*"))  # atomic writes leave no temporaries


def run_and_check_path(spec, w):
    from moecc.backends.tvm.cache import load_kernels
    from moecc.backends.tvm.op import kernel_key
    from moecc.backends.tvm.runtime import target_for

    run_and_check(spec, w, 2)
    key, _ = kernel_key(spec, torch.float32, target_for("cpu"), CFG, 2, False, False)
    return load_kernels(key).path


# ---- CUDA builds without a GPU, export and runtime-only loading ------------------------

@pytest.mark.skipif(not __import__("shutil").which("nvcc"), reason="needs nvcc")
@pytest.mark.parametrize("arch", [90, 89, 86])
def test_cuda_source_and_cubin_build(arch, tmp_path):
    from moecc.backends.tvm.cache import cubin_path, store_module
    from moecc.backends.tvm.cuda_binaries import ELF_MAGIC
    from moecc.backends.tvm.op import kernel_key
    from moecc.backends.tvm.key import TargetSpec
    from moecc.backends.tvm.build import build_module

    spec, _ = make_layer(GPT_OSS, activation="swiglu_oai", bias=True)
    key, _ = kernel_key(spec, torch.float16, TargetSpec("cuda", arch=arch), None, 16, True, True, "h100_sxm")
    so = tmp_path / "k.so"
    store_module(key, so)
    cubin = cubin_path(so).read_bytes()
    assert so.stat().st_size > 0 and cubin.startswith(ELF_MAGIC)
    assert (struct.unpack_from("<I", cubin, 48)[0] >> 8) & 0xFF == arch  # EF_CUDA_SM
    source = build_module(key).source
    for name in ("moe_gate_up_act_kernel", "moe_down_weighted_kernel", "moe_combine_kernel", "__shared__"):
        assert name in source


@pytest.mark.skipif(not __import__("shutil").which("nvcc"), reason="needs nvcc")
def test_cubin_served_to_tvm_first_use_compile(tmp_path):
    """The callback TVM's CUDA module calls at first use returns our ahead-of-time cubin."""
    import tvm_ffi

    from moecc.backends.tvm.cuda_binaries import CALLBACK, serve_cubins, source_digest

    serve_cubins({source_digest("// moecc test source"): b"\x7fELF-test"})
    assert bytes(tvm_ffi.get_global_func(CALLBACK)("// moecc test source")) == b"\x7fELF-test"


def test_export_llvm_and_load_with_runtime_only(tmp_path):
    from moecc.backends.tvm import export_kernels
    from moecc.shapes import MoEShape

    export_kernels([MoEShape("tiny", 8, 2, 64, 32)], "llvm", tmp_path, dtype="float32", token_buckets=(1,))
    code = f"""
import sys, torch
from moecc.backends.tvm import load_kernels
from moecc.backends import reference
from moecc.spec import MoELayerSpec, RouterSpec, ExpertSpec
from moecc.weights import make_weights
from moecc.tolerances import check_close
ek = load_kernels({str(tmp_path)!r})
spec = MoELayerSpec(RouterSpec(8, 2), ExpertSpec(64, 32))
w = make_weights(router_weight=torch.randn(8, 64) / 8, gate_up=torch.randn(8, 64, 64) / 8,
                 down=torch.randn(8, 64, 32) / 6)
x = torch.randn(5, 64)
check_close(ek.moe_layer(x, w, spec), reference.moe_layer(x, w, spec))
assert 'tvm' not in sys.modules, 'the TVM compiler package was imported'
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.skipif(not __import__("shutil").which("nvcc"), reason="needs nvcc")
def test_cli_export_cuda(tmp_path, capsys):
    from moecc.cli import main

    assert main(["export", "--shape", "E=8,N=32,K=64,topk=2", "--target", "cuda", "--arch", "90",
                 "--tokens", "1", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.so"))) == 1 and len(list(tmp_path.glob("*.cubin"))) == 1
    assert (tmp_path / "manifest.json").exists()


def _unaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values at a data pointer 4 bytes past a 64-byte boundary."""
    buf = torch.empty(t.numel() * t.element_size() + 4, dtype=torch.uint8)
    out = buf[4:].view(t.dtype).view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 64 != 0
    return out


@pytest.mark.tvm
def test_unaligned_weights_and_hidden_states_are_copied_not_crashed():
    """TVM assumes 64-byte aligned buffers and LLVM emits aligned vector loads: an
    unaligned view used to kill the process (segfault). Now it is copied, with a warning
    for large tensors."""
    from moecc.backends.tvm import moe_layer

    torch.manual_seed(0)
    spec, w = layer_factory.make_layer(RouterSpec(8, 2), k=64, n=32)
    x = _unaligned_copy(torch.randn(3, 64))
    unaligned = w._replace(gate_up=_unaligned_copy(w.gate_up), down=_unaligned_copy(w.down))
    check_close(moe_layer(x, unaligned, spec), reference.moe_layer(x, w, spec), torch.float32)
