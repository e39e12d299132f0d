"""moecc::gqa_decode_attention (moecc/gqa.py) against transformers' own attention math:
repeat_kv + SDPA (Qwen3-MoE, Mixtral, ...) and GPT-OSS's eager attention with sinks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecc.gqa import gqa_decode_attention_reference, live_range
from moecc.tolerances import check_close

# B batch, HQ query heads, HKV KV heads, D head width, L static cache slots
B, HQ, HKV, D, L = 3, 8, 2, 16, 37  # L: not a multiple of any block size


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, L, D] -> [B, Hkv*n, L, D]."""
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n, l, d).reshape(b, h * n, l, d)


def _sdpa_reference(q, k, v, mask, scale, is_causal=False):
    """transformers' sdpa_attention_forward with repeat_kv, in fp32."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.float(), _repeat_kv(k.float(), g), _repeat_kv(v.float(), g),
                                          attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.float(),
                                          scale=scale, is_causal=is_causal)


def _gpt_oss_reference(q, k, v, additive, sinks, scale):
    """modeling_gpt_oss.eager_attention_forward (dropout 0), in fp32."""
    g = q.shape[1] // k.shape[1]
    w = torch.matmul(q.float(), _repeat_kv(k.float(), g).transpose(2, 3)) * scale + additive.float()
    s = sinks.float().reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    logits = torch.cat([w, s], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    return torch.matmul(F.softmax(logits, dim=-1)[..., :-1], _repeat_kv(v.float(), g))


def _inputs(s: int, dtype=torch.float32, seed: int = 0, l: int = L):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, s, D, generator=g)  # [B, HQ, S, D]
    k = torch.randn(B, HKV, l, D, generator=g)  # [B, HKV, L, D]: the static cache
    v = torch.randn(B, HKV, l, D, generator=g)
    return [t.to(dtype) for t in (q, k, v)]


def _static_cache_mask(s: int, live: int, l: int = L, window: int = 0) -> torch.Tensor:
    """[B, 1, S, L] bool: `live` slots written (the last S are the new tokens, causal),
    batch row 0 left-padded by 3 slots; `window` > 0 hides slots older than the window."""
    mask = torch.zeros(B, 1, s, l, dtype=torch.bool)
    for i in range(s):
        pos = live - s + i  # the query's own slot
        mask[:, :, i, max(0, pos - window + 1) if window else 0: pos + 1] = True
    mask[0, :, :, :3] = False
    return mask


def _to_additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """transformers' eager masks: 0 where visible, finfo(dtype).min where hidden."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


@pytest.mark.parametrize("kernel", ["auto", "flash", "grouped"])
@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("s,live", [(1, 4), (1, 23), (1, L), (3, 23)])  # live 4: one real token in row 0
def test_matches_repeat_kv_sdpa_over_the_static_cache(kernel, trim, s, live):
    q, k, v = _inputs(s, seed=live)
    mask = _static_cache_mask(s, live)
    got = gqa_decode_attention_reference(q, k, v, mask, None, 0.3, trim=trim, kernel=kernel)
    assert got.shape == (B, HQ, s, D)
    check_close(got, _sdpa_reference(q, k, v, mask, 0.3))


def test_valid_length_one():
    q, k, v = _inputs(1)
    mask = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    mask[..., 0] = True  # only the first slot written
    for kernel in ("flash", "grouped"):
        got = gqa_decode_attention_reference(q, k, v, mask, None, 0.3, kernel=kernel)
        check_close(got, _sdpa_reference(q, k, v, mask, 0.3))
        check_close(got, _repeat_kv(v, HQ // HKV)[:, :, :1].expand(B, HQ, 1, D))  # softmax of one slot: v[0]


@pytest.mark.parametrize("kernel", ["flash", "grouped"])
def test_sliding_window_mask(kernel):
    q, k, v = _inputs(2, seed=1)
    mask = _static_cache_mask(2, live=30, window=8)
    assert live_range(mask, False, L) == (21, 30)  # the window is all the op reads
    got = gqa_decode_attention_reference(q, k, v, mask, None, 0.3, kernel=kernel)
    check_close(got, _sdpa_reference(q, k, v, mask, 0.3))


@pytest.mark.parametrize("kernel", ["flash", "grouped"])
@pytest.mark.parametrize("window", [0, 8])
def test_sinks_match_gpt_oss_eager(kernel, window):
    q, k, v = _inputs(1, seed=2)
    mask = _to_additive(_static_cache_mask(1, live=25, window=window), torch.float32)
    sinks = torch.randn(HQ, generator=torch.Generator().manual_seed(3)) * 2
    got = gqa_decode_attention_reference(q, k, v, mask, sinks, 0.3, kernel=kernel)
    check_close(got, _gpt_oss_reference(q, k, v, mask, sinks, 0.3))
    plain = gqa_decode_attention_reference(q, k, v, mask, None, 0.3, kernel=kernel)
    assert not torch.allclose(got, plain)  # the sinks take part


def test_registered_op_causal_per_head_float_mask_and_empty_rows():
    op = torch.ops.moecc.gqa_decode_attention
    q, k, v = _inputs(L, seed=4)
    check_close(op(q, k, v, None, None, 0.25, True), _sdpa_reference(q, k, v, None, 0.25, is_causal=True))
    q, k, v = _inputs(2, seed=5)
    additive = torch.randn(B, HQ, 2, L) * 0.5  # a finite bias per head: added, not a mask
    additive[..., 30:] = float("-inf")
    check_close(op(q, k, v, additive, None, 0.25, False), _sdpa_reference(q, k, v, additive, 0.25))
    mask = _static_cache_mask(2, live=20)
    mask[1] = False  # a batch row that sees nothing: zeros (as SDPA), never NaN
    got = op(q, k, v, mask, None, 0.25, False)
    check_close(got, _sdpa_reference(q, k, v, mask, 0.25))
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_float_min_mask_row_that_sees_nothing_is_not_cut():
    """A row all at finfo.min: SDPA averages every slot; cutting would change that."""
    q, k, v = _inputs(1, seed=6)
    mask = _static_cache_mask(1, live=12)
    mask[2] = False
    additive = _to_additive(mask, torch.float32)
    assert live_range(additive, False, L) == (0, L)
    assert live_range(additive, True, L) == (0, 12)  # with sinks that row's weights are 0 anyway
    check_close(gqa_decode_attention_reference(q, k, v, additive, None, 0.3),
                _sdpa_reference(q, k, v, additive, 0.3))


@pytest.mark.parametrize("kernel", ["flash", "grouped"])
def test_bf16_within_tolerance(kernel):
    q, k, v = _inputs(1, torch.bfloat16, seed=7, l=300)
    mask = _static_cache_mask(1, live=211, l=300)
    got = gqa_decode_attention_reference(q, k, v, mask, None, D ** -0.5, kernel=kernel)
    assert got.dtype == torch.bfloat16
    check_close(got, _sdpa_reference(q, k, v, mask, D ** -0.5), dtype=torch.bfloat16)
    sinks = torch.randn(HQ, generator=torch.Generator().manual_seed(8)).bfloat16()
    additive = _to_additive(mask, torch.bfloat16)
    got = gqa_decode_attention_reference(q, k, v, additive, sinks, D ** -0.5, kernel=kernel)
    check_close(got, _gpt_oss_reference(q, k, v, additive, sinks, D ** -0.5), dtype=torch.bfloat16)


def test_nan_in_the_cache_is_not_hidden():
    """NaN never passes: a NaN in a visible slot reaches the output (the check fails)."""
    q, k, v = _inputs(1, seed=9)
    v[:, :, 5] = float("nan")
    got = gqa_decode_attention_reference(q, k, v, _static_cache_mask(1, live=20), None, 0.3)
    assert torch.isnan(got).any()
    with pytest.raises(AssertionError):
        check_close(got, _sdpa_reference(q, k, v, _static_cache_mask(1, live=20), 0.3))


def test_the_cache_is_read_in_place_without_repeated_heads():
    """No temporary of repeated-K/V size: peak allocation well under one repeated K."""
    from torch.profiler import ProfilerActivity, profile

    l = 4096
    q, k, v = _inputs(1, seed=10, l=l)
    mask = _static_cache_mask(1, live=l, l=l)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        gqa_decode_attention_reference(q, k, v, mask, None, 0.3)
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    assert peak < k.numel() * k.element_size() * (HQ // HKV) / 4, f"peak {peak} bytes"


def test_bad_shapes_say_what_is_wrong():
    q, k, v = _inputs(1)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        gqa_decode_attention_reference(q[:, :5], k, v, None, None, 0.3)
    with pytest.raises(ValueError, match="sinks must be"):
        gqa_decode_attention_reference(q, k, v, None, torch.zeros(3), 0.3)
