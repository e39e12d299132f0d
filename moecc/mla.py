"""Multi-head latent attention (MLA) over the compressed cache: the reference op.

    moecc::mla_attention(query [B, H, S, Dn+Dr], latent [B, 1, L, R], rope_key [B, 1, L, Dr],
                         kv_b_weight [H*(Dn+Dv), R], attn_mask?, scale, is_causal, Dn, Dv)
        -> [B, H, S, Dv]

Legend: B batch, H query heads, S query tokens, L cache length (static: max length),
R kv_lora_rank (the latent), Dn nope key width, Dr rope key width, Dv value width.

Semantics: exactly `scaled_dot_product_attention(q, K, V, attn_mask, scale, is_causal)` of
transformers' MLA modules (DeepSeek-V2/V3, Kimi, GLM-4-MoE-Lite, LongCat, ...), where
    K = [latent @ W_UK^T | rope_key broadcast over heads]   [B, H, L, Dn+Dr]
    V = latent @ W_UV^T                                     [B, H, L, Dv]
and W_UK [H, Dn, R], W_UV [H, Dv, R] are the two row blocks of kv_b_proj's weight (views,
never copied). Two ways to compute it:
  absorbed  (decode, few query tokens): W_UK folded into the query, attention over the
            latent as ONE shared KV head of width R+Dr, the context taken in latent space
            and W_UV applied after:  q_lat = q_nope @ W_UK        [B, H, S, R]
                                     p = softmax(scale * (q_lat @ latent^T + q_rope @ rope^T))
                                     out = (p @ latent) @ W_UV^T  [B, H, S, Dv]
            No per-token K/V is materialised; work per step ~ H*S*L*(2R+Dr).
  expanded  (prefill, many query tokens): transformers' own order, latent expanded once
            through kv_b_proj (work ~ L*H*R*(Dn+Dv)); cheaper once S is large.
`mla_attention` picks the cheaper of the two by that arithmetic (`choose_form`).

Valid length: the mask says which cache slots are live. On the CPU the op attends only up
to the last slot any query may see (one host read of the mask, harmless there); on other
devices it attends over the whole cache under the mask, so that it has no host reads and
works under CUDA-graph capture. Masked slots contribute exactly zero either way.
Rows whose every slot is masked give zeros (as torch's math SDPA does).

Importing this module defines the op; nothing imports it at moecc import time.
"""

from __future__ import annotations

from typing import Optional

import torch

_LIB = torch.library.Library("moecc", "FRAGMENT")
_LIB.define("mla_attention(Tensor query, Tensor latent, Tensor rope_key, Tensor kv_b_weight, Tensor? attn_mask, "
            "float scale, bool is_causal, int qk_nope_head_dim, int v_head_dim) -> Tensor")

FORMS = ("auto", "absorbed", "expanded")


def choose_form(q_tokens: int, heads: int, latent: int, nope: int, rope: int, value: int) -> str:
    """The cheaper form per cache slot: absorbed costs ~S*H*(2R+Dr) multiply-adds, expanded
    ~H*R*(Dn+Dv) (the kv_b_proj expansion) + S*H*(Dn+Dr+Dv). Decode (S=1) is absorbed at
    every real MLA width; long prefills are expanded."""
    absorbed = q_tokens * heads * (2 * latent + rope)
    expanded = heads * latent * (nope + value) + q_tokens * heads * (nope + rope + value)
    return "absorbed" if absorbed <= expanded else "expanded"


def _allowed(attn_mask: Optional[torch.Tensor], is_causal: bool, s: int, l: int, device) -> Optional[torch.Tensor]:
    """Boolean [.., S, L] of the slots each query may see, or None for all of them."""
    if is_causal:
        if attn_mask is not None:
            raise ValueError("moecc::mla_attention: give attn_mask or is_causal, not both (as SDPA)")
        return torch.ones(s, l, dtype=torch.bool, device=device).tril()  # SDPA: top-left aligned
    if attn_mask is None:
        return None
    return attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")


def _live_length(allowed: Optional[torch.Tensor], l: int) -> int:
    """1 + the last cache slot any query may see (CPU only: a host read)."""
    if allowed is None:
        return l
    cols = allowed.reshape(-1, allowed.shape[-1]).any(dim=0)  # [L]
    idx = cols.nonzero()
    return max(int(idx[-1]) + 1, 1) if idx.numel() else 1


def _check(query, latent, rope_key, kv_b_weight, nope, value) -> tuple[int, int, int, int, int, int]:
    if query.dim() != 4 or latent.dim() != 4 or rope_key.dim() != 4 or kv_b_weight.dim() != 2:
        raise ValueError("moecc::mla_attention wants query [B,H,S,Dn+Dr], latent [B,1,L,R], rope_key [B,1,L,Dr], "
                         f"kv_b_weight [H*(Dn+Dv),R]; got {tuple(query.shape)}, {tuple(latent.shape)}, "
                         f"{tuple(rope_key.shape)}, {tuple(kv_b_weight.shape)}")
    b, h, s, dq = query.shape
    r, dr = latent.shape[-1], rope_key.shape[-1]
    if (latent.shape[1] != 1 or rope_key.shape[1] != 1 or latent.shape[2] != rope_key.shape[2]
            or dq != nope + dr or tuple(kv_b_weight.shape) != (h * (nope + value), r)):
        raise ValueError(f"moecc::mla_attention: inconsistent widths: query {tuple(query.shape)}, latent "
                         f"{tuple(latent.shape)}, rope_key {tuple(rope_key.shape)}, kv_b_weight "
                         f"{tuple(kv_b_weight.shape)}, qk_nope_head_dim={nope}, v_head_dim={value}")
    return b, h, s, r, dr, latent.shape[2]


def _softmax(scores: torch.Tensor, allowed: Optional[torch.Tensor], additive: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 softmax over the last dim; fully masked rows give zeros, not NaN."""
    scores = scores.float()
    if additive is not None:
        scores = scores + additive.float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    if allowed is not None:
        p = torch.nan_to_num(p, nan=0.0)
    # Subnormal probabilities (peaked rows) would make the context GEMM crawl on x86 (~8x
    # measured); they add < L * 1.2e-38 to any output, far below fp32 rounding: zero them.
    return p.masked_fill_(p < torch.finfo(torch.float32).tiny, 0.0)


def mla_attention_reference(query: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor,
                            kv_b_weight: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
                            is_causal: bool, qk_nope_head_dim: int, v_head_dim: int,
                            form: str = "auto", trim: Optional[bool] = None) -> torch.Tensor:
    """The op's implementation (plain torch). `form` forces absorbed / expanded (tests);
    `trim` (default: on the CPU) cuts the cache to its live length first."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    nope, value = qk_nope_head_dim, v_head_dim
    b, h, s, r, dr, l = _check(query, latent, rope_key, kv_b_weight, nope, value)
    allowed = _allowed(attn_mask, is_causal, s, l, query.device)
    additive = attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else None
    if trim if trim is not None else query.device.type == "cpu":
        live = _live_length(allowed, l)
        if live < l:
            latent, rope_key, l = latent[:, :, :live], rope_key[:, :, :live], live
            allowed = allowed[..., :live]
            additive = additive[..., :live] if additive is not None else None
    if form == "auto":
        form = choose_form(s, h, r, nope, dr, value)
    w = kv_b_weight.view(h, nope + value, r)
    w_uk, w_uv = w[:, :nope], w[:, nope:]  # [H, Dn, R], [H, Dv, R]: views
    q_nope, q_rope = query[..., :nope], query[..., nope:]  # [B, H, S, Dn], [B, H, S, Dr]
    c = latent[:, 0]  # [B, L, R]
    k_r = rope_key[:, 0]  # [B, L, Dr]
    if form == "absorbed":
        q_heads = q_nope.transpose(0, 1).reshape(h, b * s, nope)  # [H, B*S, Dn]
        q_lat = torch.bmm(q_heads, w_uk).view(h, b, s, r).transpose(0, 1)  # [B, H, S, R]
        q_lat = q_lat.reshape(b, h * s, r)
        scores = torch.bmm(q_lat, c.transpose(1, 2))  # [B, H*S, L]
        scores = scores + torch.bmm(q_rope.reshape(b, h * s, dr), k_r.transpose(1, 2))
        scores = (scores * scale).view(b, h, s, l)
        p = _softmax(scores, allowed, additive).to(query.dtype)
        ctx = torch.bmm(p.view(b, h * s, l), c).view(b, h, s, r)  # [B, H, S, R]
        ctx = ctx.transpose(0, 1).reshape(h, b * s, r)  # [H, B*S, R]
        out = torch.bmm(ctx, w_uv.transpose(1, 2)).view(h, b, s, value)  # [H, B, S, Dv]
        return out.transpose(0, 1).contiguous()  # [B, H, S, Dv]
    kv = torch.matmul(c, kv_b_weight.t()).view(b, l, h, nope + value).transpose(1, 2)  # [B, H, L, Dn+Dv]
    k_nope, v = kv[..., :nope], kv[..., nope:]
    scores = torch.matmul(q_nope, k_nope.transpose(2, 3))  # [B, H, S, L]
    scores = scores + torch.matmul(q_rope, k_r.unsqueeze(1).transpose(2, 3))
    p = _softmax(scores * scale, allowed, additive).to(query.dtype)
    return torch.matmul(p, v).contiguous()  # [B, H, S, Dv]


def _op(query, latent, rope_key, kv_b_weight, attn_mask, scale, is_causal, qk_nope_head_dim, v_head_dim):
    return mla_attention_reference(query, latent, rope_key, kv_b_weight, attn_mask, scale, is_causal,
                                   qk_nope_head_dim, v_head_dim)


def _fake(query, latent, rope_key, kv_b_weight, attn_mask, scale, is_causal, qk_nope_head_dim, v_head_dim):
    b, h, s, _ = query.shape
    return query.new_empty(b, h, s, v_head_dim)


_LIB.impl("mla_attention", _op, "CompositeExplicitAutograd")
torch.library.register_fake("moecc::mla_attention", _fake, lib=_LIB)
