"""moecc's TVM GQA decode kernel (backends/tvm/kernels_llvm_attention.py through moecc/gqa.py)
against the op's semantics (the plain fp32 grouped reference over the whole cache, and
transformers' repeat_kv + SDPA / GPT-OSS eager with sinks), on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")

from moecc.gqa import gqa_decode_attention_reference  # noqa: E402
from moecc.tolerances import check_close  # noqa: E402

# HQ query heads, HKV KV heads (G = 4 query rows per KV head), D head width: the kernel's
# loops at small widths (two 16-lane chunks of D)
HQ, HKV, D = 8, 2, 32


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n, l, d).reshape(b, h * n, l, d)


def _sdpa(q, k, v, mask, scale):
    """transformers' sdpa_attention_forward with repeat_kv, in fp32."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.float(), _repeat_kv(k.float(), g), _repeat_kv(v.float(), g),
                                          attn_mask=mask if mask.dtype == torch.bool else mask.float(), scale=scale)


def _gpt_oss(q, k, v, additive, sinks, scale):
    """modeling_gpt_oss.eager_attention_forward (dropout 0), in fp32."""
    g = q.shape[1] // k.shape[1]
    w = torch.matmul(q.float(), _repeat_kv(k.float(), g).transpose(2, 3)) * scale + additive.float()
    s = sinks.float().reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    logits = torch.cat([w, s], dim=-1)
    return torch.matmul(F.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1], _repeat_kv(v.float(), g))


def _inputs(b, s, l, dtype=torch.float32, seed=0, hq=HQ, hkv=HKV, d=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g)  # [B, Hq, S, D]
    k = torch.randn(b, hkv, l, d, generator=g)  # [B, Hkv, L, D]: the static cache
    v = torch.randn(b, hkv, l, d, generator=g)
    return [t.to(dtype) for t in (q, k, v)]


def _mask(b, s, l, live, window=0, pad=0):
    """[B, 1, S, L] bool: `live` slots written (the last S the new tokens, causal), batch
    row 0 left-padded by `pad` slots, `window` > 0 hides slots older than the window."""
    mask = torch.zeros(b, 1, s, l, dtype=torch.bool)
    for i in range(s):
        pos = live - s + i
        mask[:, :, i, max(0, pos - window + 1) if window else 0: pos + 1] = True
    mask[0, :, :, :pad] = False
    return mask


@pytest.fixture(params=["amx", "bf16", "fp32"])
def dot(request, monkeypatch):
    """The multiply form bf16 inputs take: AMX tiles, `vdpbf16ps`, or widened to fp32 FMAs
    (each one the fallback of the one before: the CPU features are reported missing).
    A form this CPU does not have is skipped; fp32 inputs take the fp32 form whatever this is."""
    import moecc.backends.tvm.attention as tvm_attention

    real = tvm_attention.cpu_has
    if request.param == "amx" and not real("amx_bf16"):
        pytest.skip("this CPU (or process) has no AMX-BF16")
    if request.param == "bf16" and not real("avx512_bf16"):
        pytest.skip("this CPU has no AVX512-BF16")
    hidden = {"amx": (), "bf16": ("amx_bf16",), "fp32": ("amx_bf16", "avx512_bf16")}[request.param]
    monkeypatch.setattr(tvm_attention, "cpu_has", lambda feature: feature not in hidden and real(feature))
    return request.param


def _check_dot(dot, q, k):
    """The kernel really took the form under test (bf16 inputs of the shapes it is written for)."""
    import moecc.backends.tvm.attention as tvm_attention

    rows = q.shape[1] // k.shape[1] * q.shape[2]
    kind = tvm_attention.dot_kind(rows, k.shape[-1], k.shape[-1], k.dtype, q.dtype)
    assert kind == (dot if q.dtype == torch.bfloat16 else "fp32"), kind


def _semantics(q, k, v, mask, sinks, scale):
    """The op's semantics: the plain fp32 grouped path over the whole cache (no cut)."""
    return gqa_decode_attention_reference(q, k, v, mask, sinks, scale, trim=False, kernel="grouped")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,l,live,pad", [(1, 37, 1, 0), (1, 37, 23, 0), (1, 37, 37, 0), (8, 37, 23, 5),
                                          (1, 1000, 701, 0), (8, 600, 555, 40)])
def test_matches_the_semantics(dtype, b, l, live, pad, dot):
    """Valid length 1 / not a multiple of any block or chunk / full; batch 1 and 8 with a
    left-padded row; 600-1000 slots: several chunks per head (the combine); every multiply
    form bf16 can take (AMX, vdpbf16ps, widened)."""
    if dtype == torch.float32 and dot != "fp32":
        pytest.skip("fp32 inputs always take the fp32 form")
    q, k, v = _inputs(b, 1, l, dtype, seed=live + b)
    _check_dot(dot, q, k)
    mask = _mask(b, 1, l, live, pad=pad)
    got = gqa_decode_attention_reference(q, k, v, mask, None, D ** -0.5, kernel="tvm")
    assert got.dtype == dtype and got.shape == (b, HQ, 1, D)
    check_close(got, _semantics(q, k, v, mask, None, D ** -0.5), dtype=dtype)
    check_close(got, _sdpa(q, k, v, mask, D ** -0.5), dtype=dtype)


@pytest.mark.parametrize("g", [2, 8, 16])
def test_group_sizes(g):
    """G = Hq / Hkv of 2, 8 (Qwen3-30B-A3B), 16."""
    q, k, v = _inputs(2, 1, 300, seed=g, hq=2 * g, hkv=2, d=64)
    mask = _mask(2, 1, 300, 290, pad=7)
    check_close(gqa_decode_attention_reference(q, k, v, mask, None, 0.125, kernel="tvm"),
                _sdpa(q, k, v, mask, 0.125))


@pytest.mark.parametrize("g", [2, 8, 16])
def test_bf16_group_sizes_and_two_query_tokens(g, dot):
    """bf16 at G = 2, 8, 16 (R = 16 is past the AMX kernel: vdpbf16ps or widened there) and
    two query tokens under a sliding window, D = 128 (four 32-wide tiles of the query)."""
    import moecc.backends.tvm.attention as tvm_attention

    q, k, v = _inputs(2, 1, 300, torch.bfloat16, seed=g, hq=2 * g, hkv=2, d=128)
    mask = _mask(2, 1, 300, 290, pad=7)
    if g != 16:
        _check_dot(dot, q, k)
    else:
        assert tvm_attention.dot_kind(16, 128, 128, k.dtype, q.dtype) == ("fp32" if dot == "fp32" else "bf16")
    got = gqa_decode_attention_reference(q, k, v, mask, None, 0.09, kernel="tvm")
    check_close(got, _semantics(q, k, v, mask, None, 0.09), dtype=torch.bfloat16)
    if g == 16:
        return  # G * S = 32 rows: no TVM kernel for that
    q, k, v = _inputs(3, 2, 400, torch.bfloat16, seed=g + 1, hq=2 * g, hkv=2, d=128)
    mask = _mask(3, 2, 400, 350, window=64, pad=5)
    got = gqa_decode_attention_reference(q, k, v, mask, None, 0.09, kernel="tvm")
    check_close(got, _semantics(q, k, v, mask, None, 0.09), dtype=torch.bfloat16)


def test_two_query_tokens_causal_and_sliding_window():
    """S = 2 (rows g*S + s), causal inside the cache, a sliding window: the cut reads the window."""
    q, k, v = _inputs(3, 2, 400, seed=11)
    mask = _mask(3, 2, 400, 350, window=64, pad=0)
    got = gqa_decode_attention_reference(q, k, v, mask, None, 0.2, kernel="tvm")
    check_close(got, _sdpa(q, k, v, mask, 0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 16])
def test_sinks_match_gpt_oss_eager(dtype, window, dot):
    if dtype == torch.float32 and dot != "fp32":
        pytest.skip("fp32 inputs always take the fp32 form")
    q, k, v = _inputs(2, 1, 300, dtype, seed=12)
    _check_dot(dot, q, k)
    additive = torch.zeros(2, 1, 1, 300, dtype=dtype).masked_fill(~_mask(2, 1, 300, 280, window=window, pad=9),
                                                                 torch.finfo(dtype).min)
    sinks = (torch.randn(HQ, generator=torch.Generator().manual_seed(13)) * 2).to(dtype)
    got = gqa_decode_attention_reference(q, k, v, additive, sinks, 0.3, kernel="tvm")
    check_close(got, _gpt_oss(q, k, v, additive, sinks, 0.3), dtype=dtype)
    check_close(got, _semantics(q, k, v, additive, sinks, 0.3), dtype=dtype)
    assert not torch.allclose(got.float(), gqa_decode_attention_reference(q, k, v, additive, None, 0.3).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_that_see_nothing_give_zeros_and_float_min_rows_average(dtype, dot):
    if dtype == torch.float32 and dot != "fp32":
        pytest.skip("fp32 inputs always take the fp32 form")
    q, k, v = _inputs(3, 1, 50, dtype, seed=14)
    mask = _mask(3, 1, 50, 30)
    mask[1] = False  # a row that sees nothing: zeros (as SDPA), never NaN
    got = gqa_decode_attention_reference(q, k, v, mask, None, 0.3, kernel="tvm")
    check_close(got, _sdpa(q, k, v, mask, 0.3), dtype=dtype)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    check_close(gqa_decode_attention_reference(q, k, v, additive, None, 0.3, kernel="tvm"),
                _sdpa(q, k, v, additive, 0.3), dtype=dtype)  # SDPA averages every slot for that row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["k", "v"])
def test_nan_in_a_visible_slot_reaches_the_output(where, dtype, dot):
    if dtype == torch.float32 and dot != "fp32":
        pytest.skip("fp32 inputs always take the fp32 form")
    q, k, v = _inputs(1, 1, 600, dtype, seed=15)
    _check_dot(dot, q, k)
    (k if where == "k" else v)[:, :, 300] = float("nan")
    mask = _mask(1, 1, 600, 500)
    got = gqa_decode_attention_reference(q, k, v, mask, None, 0.3, kernel="tvm")
    assert torch.isnan(got).any()
    with pytest.raises(AssertionError):
        check_close(got, _sdpa(q, k, v, mask, 0.3), dtype=dtype)
    (k if where == "k" else v)[:, :, 300] = 0.0
    expected = _sdpa(q, k, v, mask, 0.3)
    (k if where == "k" else v)[:, :, 550] = float("nan")  # past the live length: never read
    check_close(gqa_decode_attention_reference(q, k, v, mask, None, 0.3, kernel="tvm"), expected, dtype=dtype)


def test_auto_takes_the_tvm_kernel_and_falls_back_without_tvm(monkeypatch):
    import moecc.backends.tvm.attention as tvm_attention

    q, k, v = _inputs(2, 1, 100, seed=16)
    mask = _mask(2, 1, 100, 77, pad=3)
    auto = gqa_decode_attention_reference(q, k, v, mask, None, 0.3)
    assert torch.equal(auto, gqa_decode_attention_reference(q, k, v, mask, None, 0.3, kernel="tvm"))
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))  # bf16 under 8 MiB of live K/V: flash (measured faster)
    assert torch.equal(gqa_decode_attention_reference(qb, kb, vb, mask, None, 0.3),
                       gqa_decode_attention_reference(qb, kb, vb, mask, None, 0.3, kernel="flash"))
    import moecc.gqa

    monkeypatch.setattr(tvm_attention, "available", lambda: False)
    moecc.gqa._tvm_plan.cache_clear()  # the op caches its per-shape plan (TVM's presence is per process)
    try:
        fallback = gqa_decode_attention_reference(q, k, v, mask, None, 0.3)
        assert torch.equal(fallback, gqa_decode_attention_reference(q, k, v, mask, None, 0.3, kernel="flash"))
        with pytest.raises(ValueError, match="TVM kernel needs"):
            gqa_decode_attention_reference(q, k, v, mask, None, 0.3, kernel="tvm")
    finally:
        monkeypatch.undo()
        moecc.gqa._tvm_plan.cache_clear()


def test_shapes_it_does_not_take_use_the_other_kernels():
    for s, hq in ((3, HQ), (1, HKV)):  # G*S = 12: not a power of two; G*S = 1 (MHA)
        q, k, v = _inputs(1, s, 40, seed=17, hq=hq)
        mask = _mask(1, s, 40, 30)
        with pytest.raises(ValueError, match="TVM kernel needs"):
            gqa_decode_attention_reference(q, k, v, mask, None, 0.3, kernel="tvm")
        check_close(gqa_decode_attention_reference(q, k, v, mask, None, 0.3), _sdpa(q, k, v, mask, 0.3))
    per_head = torch.randn(1, HQ, 1, 40) * 0.5  # a bias per head: flash takes it
    q, k, v = _inputs(1, 1, 40, seed=18)
    check_close(gqa_decode_attention_reference(q, k, v, per_head, None, 0.3), _sdpa(q, k, v, per_head, 0.3))


def test_auto_takes_amx_for_bf16_from_2_mib():
    """bf16 on the AMX kernel: auto takes it from 2 MiB of live K/V (below: flash)."""
    import moecc.backends.tvm.attention as tvm_attention

    if not tvm_attention.cpu_has("amx_bf16"):
        pytest.skip("this CPU (or process) has no AMX-BF16")
    q, k, v = _inputs(1, 1, 4200, torch.bfloat16, seed=19, hq=8, hkv=2, d=128)
    mask = _mask(1, 1, 4200, 4100)  # 2 * 2 heads * 4100 slots * 256 B = 4.2 MB live
    auto = gqa_decode_attention_reference(q, k, v, mask, None, 0.09)
    assert torch.equal(auto, gqa_decode_attention_reference(q, k, v, mask, None, 0.09, kernel="tvm"))
    check_close(auto, _semantics(q, k, v, mask, None, 0.09), dtype=torch.bfloat16)
    small = _mask(1, 1, 4200, 1000)  # 1 MB live: flash
    assert torch.equal(gqa_decode_attention_reference(q, k, v, small, None, 0.09),
                       gqa_decode_attention_reference(q, k, v, small, None, 0.09, kernel="flash"))
