"""The TVM backend's token alignment (backends/tvm/align.py): the one-token fast path
produces exactly the rows of the general path, and declines repeated ids."""

from __future__ import annotations

import pytest
import torch

from moecc.backends.tvm.align import _align_general, _align_one_token, align_tokens_by_expert


@pytest.mark.parametrize("kp,block_m", [(1, 1), (2, 4), (8, 1), (9, 2)])
def test_one_token_path_equals_general(kp, block_m):
    g = torch.Generator().manual_seed(kp * 10 + block_m)
    ids = torch.randperm(64, generator=g)[:kp].view(1, kp)  # [1, k'] distinct experts
    w = torch.rand(1, kp, generator=g)
    fast, general = align_tokens_by_expert(w, ids, 64, block_m), _align_general(w, ids, 64, block_m)
    assert fast.num_blocks == general.num_blocks == kp
    for name in ("tok", "row_weight", "experts", "block_ptr", "rows"):
        a, b = getattr(fast, name), getattr(general, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_one_token_path_declines_repeated_ids():
    ids = torch.tensor([[3, 5, 3]])
    assert _align_one_token(torch.rand(1, 3), ids, 1) is None
    rows = align_tokens_by_expert(torch.rand(1, 3), ids, 8, 1)  # the general path
    assert rows.num_blocks == 3 and rows.experts.tolist() == [3, 5]
