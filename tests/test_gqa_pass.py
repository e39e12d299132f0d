"""passes/gqa_decode.py on hand-written attention modules over a cache passed in: matched by
structure (no transformers class), declined with a reason when anything differs, never a
different result."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moecc
from moecc.tolerances import check_close

# B batch, S query tokens, L cache slots, HQ/HKV query/KV heads, DH head width, D model width
B, S, L, HQ, HKV, DH = 2, 1, 12, 4, 2, 8
D = HQ * DH


def repeat_kv(x, n):  # written as transformers writes it
    b, h, l, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, l, d).reshape(b, h * n, l, d)


class CacheAttention(nn.Module):
    """One decode step of GQA over a static cache: the new K/V written, then attention."""

    def __init__(self, form: str = "sdpa", dropout: float = 0.0, write_after_repeat: bool = False,
                 leak_weights: bool = False):
        super().__init__()
        self.form, self.dropout = form, dropout
        self.write_after_repeat, self.leak_weights = write_after_repeat, leak_weights
        self.q = nn.Linear(D, D, bias=False)
        self.kv = nn.Linear(D, 2 * HKV * DH, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        self.sinks = nn.Parameter(torch.randn(HQ))

    def forward(self, x, keys, values, pos, mask):  # x [B, S, D], keys/values [B, HKV, L, DH]
        q = self.q(x).view(B, S, HQ, DH).transpose(1, 2)  # [B, HQ, S, DH]
        k_new, v_new = self.kv(x).view(B, S, 2, HKV, DH).permute(2, 0, 3, 1, 4)  # [B, HKV, S, DH] each
        keys.index_copy_(2, pos, k_new)
        if not self.write_after_repeat:
            values.index_copy_(2, pos, v_new)
        g = HQ // HKV
        k = repeat_kv(keys, g)
        v = repeat_kv(values, g)
        if self.write_after_repeat:
            values.index_copy_(2, pos, v_new)
        if self.form == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout, scale=0.3)
        elif self.form == "enable_gqa":
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3, enable_gqa=True)
        elif self.form == "eager":  # transformers' eager_attention_forward (Llama-style)
            w = torch.matmul(q, k.transpose(2, 3)) * 0.3
            w = w + torch.zeros_like(mask, dtype=w.dtype).masked_fill(~mask, torch.finfo(w.dtype).min)
            p = F.softmax(w, dim=-1, dtype=torch.float32)
            o = torch.matmul(F.dropout(p.to(q.dtype), p=self.dropout, training=self.training), v)
            if self.leak_weights:  # the attention weights used beside the output (output_attentions)
                o = o + p.amax(dim=-1, keepdim=True)
        else:  # GPT-OSS's eager attention with sinks
            w = torch.matmul(q, k.transpose(2, 3)) * 0.3
            w = w + torch.zeros_like(mask, dtype=w.dtype).masked_fill(~mask, torch.finfo(w.dtype).min)
            sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
            c = torch.cat([w, sinks], dim=-1)
            c = c - c.max(dim=-1, keepdim=True).values
            p = F.softmax(c, dim=-1, dtype=c.dtype)[..., :-1]
            o = torch.matmul(F.dropout(p, p=0.0, training=False).to(v.dtype), v)
        return self.out(o.transpose(1, 2).reshape(B, S, D))


def _run(module, **options):
    """(eager output, compiled output, report); each on its own copy of the cache."""
    torch.manual_seed(1)
    x = torch.randn(B, S, D)
    keys, values = torch.randn(B, HKV, L, DH), torch.randn(B, HKV, L, DH)
    pos = torch.tensor([7])
    mask = torch.zeros(B, 1, S, L, dtype=torch.bool)
    mask[..., :8] = True
    mask[0, ..., :3] = False  # left padding
    report = moecc.CompileReport()
    compiled = torch.compile(module, backend="moecc",
                             options={"report": report, "rest_of_graph": "eager", **options})
    with torch.no_grad():
        expected = module(x, keys.clone(), values.clone(), pos, mask)
        got = compiled(x, keys.clone(), values.clone(), pos, mask)
    return expected, got, report


@pytest.mark.parametrize("form", ["sdpa", "enable_gqa", "eager", "sinks"])
def test_rewritten_by_structure(form):
    expected, got, report = _run(CacheAttention(form).eval())
    check_close(got, expected)
    assert report.pass_counter("gqa_decode", "rewritten") == 1, report.format()
    assert report.pass_counter("gqa_decode", "declined") == 0


@pytest.mark.parametrize("module,reason", [
    (lambda: CacheAttention("sdpa", dropout=0.1), "dropout"),
    (lambda: CacheAttention("sdpa", write_after_repeat=True), "the cache is written"),
    (lambda: CacheAttention("eager", leak_weights=True), "weights are used outside"),
])
def test_declined_with_reason_and_same_result(module, reason):
    m = module().eval()
    if m.dropout:  # SDPA's dropout_p applies even in eval: compare with the rewrite off
        torch.manual_seed(0)
    expected, got, report = _run(m)
    if not m.dropout:
        check_close(got, expected)
    assert report.pass_counter("gqa_decode", "rewritten") == 0
    assert report.pass_counter("gqa_decode", "declined") == 1, report.format()
    notes = [n for g in report.graphs for p in g.passes if p.name == "gqa_decode" for n in p.notes]
    assert any(reason in n and "left as it was" in n for n in notes), notes
    assert "left as it was" in report.format()


def test_option_off():
    expected, got, report = _run(CacheAttention("sdpa").eval(), kv_rewrite=False)
    check_close(got, expected)
    assert report.pass_counter("gqa_decode", "rewritten") == 0
