"""backends/tvm/row_chunks.py: expert block ranges cut into chunks cover exactly the same
blocks with the same experts, decode-sized rows pass through untouched, and the op's
output with tiny chunks is bit-identical to the output with one range per expert."""

from __future__ import annotations

import pytest
import torch

from moecc.backends.tvm import row_chunks
from moecc.backends.tvm.align import align_tokens_by_expert


def _block_experts(rows) -> list[int]:
    """The expert of every block, from (experts, block_ptr)."""
    out = []
    for e, lo, hi in zip(rows.experts.tolist(), rows.block_ptr[:-1].tolist(), rows.block_ptr[1:].tolist()):
        out += [e] * (hi - lo)
    return out


@pytest.mark.parametrize("max_blocks", [1, 2, 3, 7])
def test_chunks_cover_the_same_blocks(max_blocks):
    g = torch.Generator().manual_seed(max_blocks)
    ids = torch.multinomial(torch.tensor([40.0, 0, 1, 9, 0, 25, 3, 2]), 2 * 300, replacement=True,
                            generator=g).view(300, 2)  # [T, k]: skewed, two experts idle
    rows = align_tokens_by_expert(torch.rand(300, 2, generator=g), ids, 8, 4)
    split = row_chunks.split_ranges(rows, max_blocks)
    sizes = (split.block_ptr[1:] - split.block_ptr[:-1]).tolist()
    assert split.experts.dtype == split.block_ptr.dtype == torch.int32
    assert all(1 <= s <= max_blocks for s in sizes)
    assert split.block_ptr[0] == 0 and split.block_ptr[-1] == rows.num_blocks
    assert _block_experts(split) == _block_experts(rows)
    assert max((rows.block_ptr[1:] - rows.block_ptr[:-1]).tolist()) > max_blocks  # something was cut
    for name in ("tok", "row_weight", "rows"):
        assert getattr(split, name) is getattr(rows, name)


def test_decode_rows_pass_through():
    rows = align_tokens_by_expert(torch.rand(1, 8), torch.randperm(64)[:8].view(1, 8), 64, 8)
    assert row_chunks.split_ranges(rows, 1) is rows
    assert row_chunks.chunk_blocks(8, 2048) == 4 and row_chunks.chunk_blocks(64, 4096) == 1


def test_op_bit_identical_with_tiny_chunks(monkeypatch):
    pytest.importorskip("tvm")
    from moecc.backends.tvm import moe_layer
    from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec
    from moecc.weights import make_weights

    g = torch.Generator().manual_seed(0)
    e, n, k = 4, 32, 64
    spec = MoELayerSpec(RouterSpec(e, 2, renormalize=True), ExpertSpec(k, n))
    w = make_weights(router_weight=torch.randn(e, k, generator=g), gate_up=torch.randn(e, 2 * n, k, generator=g) / 8,
                     down=torch.randn(e, k, n, generator=g) / 6)
    x = torch.randn(96, k, generator=g)  # ~48 rows per expert: several blocks each
    config = {"block_m": 4, "tile_n": 2, "tile_k": 2, "vec": 16, "red_tile": 32}
    whole = moe_layer(x, w, spec, config)
    calls = []
    real = row_chunks.split_ranges
    monkeypatch.setattr(row_chunks, "CHUNK_BYTES", 1)  # one block per range
    monkeypatch.setattr(row_chunks, "split_ranges", lambda r, m: calls.append(m) or real(r, m))
    chunked = moe_layer(x, w, spec, config)
    assert calls == [1]
    assert torch.isfinite(whole).all() and torch.equal(chunked, whole)
