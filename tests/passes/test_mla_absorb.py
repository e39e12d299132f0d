"""passes/mla_absorb.py on hand-written attention modules: matched by structure (no
transformers class, other attribute names), declined with a reason when anything differs,
never a different result."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moecc
from moecc.tolerances import check_close

# B batch, S query tokens, L cache slots, H heads, R latent, DN/DR/DV nope/rope/value widths
B, S, L, H, R, DN, DR, DV, D = 2, 1, 10, 4, 24, 16, 8, 12, 64


class LatentAttention(nn.Module):
    """MLA written like transformers' expand_kv, over a cache passed in (a static cache)."""

    def __init__(self, key_layout: str = "new_empty", up_bias: bool = False, leak_value: bool = False,
                 sdpa: bool = True):
        super().__init__()
        self.key_layout, self.leak_value, self.sdpa = key_layout, leak_value, sdpa
        self.q = nn.Linear(D, H * (DN + DR), bias=False)
        self.up = nn.Linear(R, H * (DN + DV), bias=up_bias)  # kv_b_proj under another name
        self.out = nn.Linear(H * DV, D, bias=False)

    def forward(self, x, latent, rope, mask):  # x [B, S, D], latent [B, 1, L, R], rope [B, 1, L, DR]
        q = self.q(x).view(B, S, H, DN + DR).transpose(1, 2)  # [B, H, S, DN+DR]
        kv = self.up(latent).view(B, L, -1, DN + DV).transpose(1, 2)  # [B, H, L, DN+DV]
        k_nope, v = torch.split(kv, [DN, DV], dim=-1)
        k_rot = rope.expand(-1, H, -1, -1)
        if self.key_layout == "cat":
            k = torch.cat((k_nope, k_rot), dim=-1)
        else:
            k = kv.new_empty(B, H, L, DN + DR)
            k[..., :DN].copy_(k_nope)
            k[..., DN:].copy_(k_rot)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)  # [B, H, S, DV]
        else:  # transformers' eager_attention_forward
            scores = (q @ k.transpose(2, 3) * 0.2).masked_fill(~mask, float("-inf"))
            o = torch.softmax(scores, dim=-1) @ v
        y = self.out(o.transpose(1, 2).reshape(B, S, H * DV))
        return y + v.mean() if self.leak_value else y


class PlainAttention(nn.Module):
    """Ordinary multi-head attention: not MLA, not this pass's business."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x, latent, rope, mask):
        q, k, v = self.qkv(x).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, D)


def _inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(B, 1, S, L, dtype=torch.bool)
    mask[..., :7] = True  # 7 live cache slots of 10
    mask[0, ..., :2] = False  # row 0 left-padded
    return torch.randn(B, S, D, generator=g), torch.randn(B, 1, L, R, generator=g), torch.randn(B, 1, L, DR, generator=g), mask


def _compile_and_run(module, **options):
    torch.manual_seed(0)
    report = moecc.CompileReport()
    args = _inputs()
    with torch.no_grad():
        expected = module(*args)
        compiled = torch.compile(module, backend="moecc",
                                 options={"report": report, "rest_of_graph": "eager", **options})
        got = compiled(*args)
    check_close(got, expected)
    result = next(p for g in report.graphs for p in g.passes if p.name == "mla_absorb")
    return result, report


@pytest.mark.parametrize("key_layout", ["new_empty", "cat"])
def test_rewrites_by_structure(key_layout):
    result, report = _compile_and_run(LatentAttention(key_layout))
    assert result.counters == {"rewritten": 1, "declined": 0, "other_attention": 0}
    assert any("H=4 R=24 nope=16 rope=8 v=12" in n for n in result.notes)
    assert "pass mla_absorb: rewritten=1" in report.format()


def test_expansion_is_gone_from_the_graph(tmp_path):
    _compile_and_run(LatentAttention(), dump_graphs=str(tmp_path))
    before = (tmp_path / "graph00_lower_kernels.txt").read_text()
    after = (tmp_path / "graph00_mla_absorb.txt").read_text()
    code = [line for line in after.splitlines() if not line.strip().startswith("#")]  # not the source comments
    after = "\n".join(code)
    assert "_nn.scaled_dot_product_attention(" in before and ".new_empty(" in before
    assert "moecc.mla_attention" in after
    for gone in ("_nn.scaled_dot_product_attention(", ".new_empty(", ".copy_(", "up_parameters_weight_, None"):
        assert gone not in after, gone


@pytest.mark.parametrize("module, reason", [
    (LatentAttention(up_bias=True), "kv_b_proj has a bias"),
    (LatentAttention(leak_value=True), "used outside the attention"),
    (LatentAttention(sdpa=False), "not attended by scaled_dot_product_attention"),
])
def test_declines_with_the_reason(module, reason):
    result, report = _compile_and_run(module)
    assert result.counters["rewritten"] == 0 and result.counters["declined"] == 1
    assert any(reason in n for n in result.notes), result.notes
    assert reason in report.format()


def test_other_attention_is_left_alone():
    result, _ = _compile_and_run(PlainAttention())
    assert result.counters == {"rewritten": 0, "declined": 0, "other_attention": 1}
    assert result.notes == []


def test_option_turns_it_off():
    result, _ = _compile_and_run(LatentAttention(), kv_rewrite=False)
    assert result.counters["rewritten"] == 0 and "kv_rewrite=False" in result.notes[0]


def test_option_must_be_bool():
    from moecc.options import OptionsError

    with pytest.raises(OptionsError, match="kv_rewrite"):
        moecc.CompileOptions(kv_rewrite="yes")
