"""moecc::mla_attention (moecc/mla.py) against SDPA over transformers' expanded K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecc.mla import choose_form, mla_attention_reference
from moecc.tolerances import check_close

# B batch, H heads, S query tokens, L cache slots, R latent, DN/DR/DV nope/rope/value widths
B, H, L, R, DN, DR, DV = 2, 4, 11, 32, 16, 8, 12


def _inputs(s: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, s, DN + DR, generator=g)  # [B, H, S, DN+DR]
    latent = torch.randn(B, 1, L, R, generator=g)  # [B, 1, L, R]
    rope = torch.randn(B, 1, L, DR, generator=g)  # [B, 1, L, DR]
    w = torch.randn(H * (DN + DV), R, generator=g) * 0.2  # kv_b_proj.weight
    return [t.to(dtype) for t in (q, latent, rope, w)]


def _sdpa(q, latent, rope, w, mask, scale, is_causal=False):
    """transformers' expand_kv + SDPA: the semantics the op must keep."""
    kv = F.linear(latent, w).view(B, L, H, DN + DV).transpose(1, 2)  # [B, H, L, DN+DV]
    k = torch.cat([kv[..., :DN], rope.expand(-1, H, -1, -1)], dim=-1)  # [B, H, L, DN+DR]
    return F.scaled_dot_product_attention(q, k, kv[..., DN:], attn_mask=mask, scale=scale, is_causal=is_causal)


def _static_cache_mask(s: int, live: int) -> torch.Tensor:
    """[B, 1, S, L] bool: a static cache with `live` slots written, batch row 0 left-padded by 2."""
    mask = torch.zeros(B, 1, s, L, dtype=torch.bool)
    for i in range(s):
        mask[:, :, i, : live - s + i + 1] = True
    mask[0, :, :, :2] = False
    return mask


@pytest.mark.parametrize("form", ["auto", "absorbed", "expanded"])
@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("s", [1, 3])
def test_matches_sdpa_over_the_static_cache(form, trim, s):
    q, latent, rope, w = _inputs(s)
    mask = _static_cache_mask(s, live=7)
    got = mla_attention_reference(q, latent, rope, w, mask, 0.3, False, DN, DV, form=form, trim=trim)
    assert got.shape == (B, H, s, DV)
    check_close(got, _sdpa(q, latent, rope, w, mask, 0.3))


def test_registered_op_causal_float_mask_and_default_scale():
    q, latent, rope, w = _inputs(L)
    op = torch.ops.moecc.mla_attention
    check_close(op(q, latent, rope, w, None, 0.25, True, DN, DV), _sdpa(q, latent, rope, w, None, 0.25, True))
    additive = torch.zeros(B, 1, L, L)
    additive[..., 8:] = float("-inf")
    additive[..., 0] = -1.5  # a finite bias must be added, not treated as a mask
    check_close(op(q, latent, rope, w, additive, 0.25, False, DN, DV), _sdpa(q, latent, rope, w, additive, 0.25))


def test_fully_masked_rows_give_zeros_not_nan():
    q, latent, rope, w = _inputs(1)
    mask = _static_cache_mask(1, live=5)
    mask[1] = False
    got = torch.ops.moecc.mla_attention(q, latent, rope, w, mask, 0.3, False, DN, DV)
    assert torch.isfinite(got).all() and not got[1].any()
    check_close(got[0], _sdpa(q, latent, rope, w, mask, 0.3)[0])


def test_bf16_within_tolerance():
    q, latent, rope, w = _inputs(1, torch.bfloat16, seed=3)
    mask = _static_cache_mask(1, live=9)
    got = torch.ops.moecc.mla_attention(q, latent, rope, w, mask, 0.3, False, DN, DV)
    assert got.dtype == torch.bfloat16
    expected = _sdpa(*(t.float() for t in (q, latent, rope, w)), mask, 0.3)
    check_close(got, expected, torch.bfloat16)


def test_absorbed_form_never_expands_the_cache():
    """The absorbed form's largest temporary is the scores [B, H, S, L], never K/V [B, H, L, .]."""
    q, latent, rope, w = _inputs(1)
    inputs = {t.untyped_storage().data_ptr() for t in (q, latent, rope, w)}
    sizes = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:
                sizes.append(out.numel())  # new memory only: views of the inputs are free
            return out

    with Spy():
        mla_attention_reference(q, latent, rope, w, None, 0.3, False, DN, DV, form="absorbed")
    assert sizes and max(sizes) <= max(B * H * L, B * H * R, B * L * R)
    assert max(sizes) < B * H * L * (DN + DV)  # what expand_kv allocates


def test_choose_form_decode_absorbed_long_prefill_expanded():
    v3 = dict(heads=128, latent=512, nope=128, rope=64, value=128)
    assert choose_form(1, **v3) == "absorbed"
    assert choose_form(8, **v3) == "absorbed"
    assert choose_form(2048, **v3) == "expanded"


def test_bad_widths_say_what_is_expected():
    q, latent, rope, w = _inputs(1)
    with pytest.raises(ValueError, match="inconsistent widths"):
        torch.ops.moecc.mla_attention(q, latent, rope, w[:-1], None, 0.3, False, DN, DV)
    with pytest.raises(ValueError, match="form must be one of"):
        mla_attention_reference(q, latent, rope, w, None, 0.3, False, DN, DV, form="flash")


def test_fake_impl_traces_under_torch_compile():
    q, latent, rope, w = _inputs(1)
    mask = _static_cache_mask(1, live=6)

    def f(q, latent, rope, w, mask):
        return torch.ops.moecc.mla_attention(q, latent, rope, w, mask, 0.3, False, DN, DV) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    check_close(compiled(q, latent, rope, w, mask), 2 * _sdpa(q, latent, rope, w, mask, 0.3))
