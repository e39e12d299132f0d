"""Triton routing and token alignment against the reference (moecc.backends.reference.routing).

Runs on the GPU when there is one, else on the CPU under the Triton interpreter (fp32 /
fp16 only there). Fresh random logits per case; sizes small so the interpreter is fast.
"""

from __future__ import annotations

import pytest
import torch
from triton_mode import triton_mode, whole_file_test  # noqa: F401  (autouse fixture)

from moecc.backends.reference.routing import route
from moecc.spec import RouterSpec

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


test_whole_file_in_interpreter_subprocess = whole_file_test(__file__)


def _route_topk(*args, **kwargs):
    from moecc.backends.triton import route_topk

    return route_topk(*args, **kwargs)


def _align(*args):
    from moecc.backends.triton import align_tokens_by_expert

    return align_tokens_by_expert(*args)


ROUTERS = {
    "softmax_top2": RouterSpec(8, 2),
    "softmax_top1": RouterSpec(8, 1),
    "softmax_renorm": RouterSpec(12, 5, renormalize=True),
    "single_expert": RouterSpec(1, 1),
    "sigmoid_plain": RouterSpec(16, 3, "sigmoid"),
    "deepseek_v3": RouterSpec(16, 4, "sigmoid", n_group=4, topk_group=2, group_scoring="top2_sum",
                              has_correction_bias=True, renormalize=True, renormalize_eps=1e-20,
                              routed_scaling_factor=2.5),
    "group_max": RouterSpec(16, 3, "sigmoid", n_group=4, topk_group=2, group_scoring="max"),
    "group_softmax_scaled": RouterSpec(20, 3, "softmax", n_group=4, topk_group=3, group_scoring="top2_sum",
                                       routed_scaling_factor=16.0),  # group size 5: not a power of two
    "group_size_one": RouterSpec(8, 2, "sigmoid", n_group=8, topk_group=3, has_correction_bias=True),
    "gpt_oss": RouterSpec(8, 3, "topk_softmax"),
}


def _logits(t, spec, dtype=torch.float32):
    return torch.randn(t, spec.num_experts, device=DEVICE).to(dtype)


def _corr(spec):
    return torch.randn(spec.num_experts, device=DEVICE) * 0.2 if spec.has_correction_bias else None


@pytest.mark.parametrize("name", sorted(ROUTERS))
@pytest.mark.parametrize("t", [1, 37])
def test_route_topk_matches_reference(name, t):
    spec = ROUTERS[name]
    logits, corr = _logits(t, spec), _corr(spec)
    weights, ids = _route_topk(logits, spec, corr)
    ref_w, ref_ids = route(logits, spec, corr)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (t, spec.top_k)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


def _distinct_fp16_logits(t, num_experts):
    """Per row a random order of distinct values exactly representable in fp16 (steps of 1/4).

    Random fp16 normals tie often (29 rows x 12 experts tie somewhere about half the time),
    and at a tie the two top-k implementations may order ids differently; the test is about
    fp16 input handling, not tie-breaking, so the logits are tie-free by construction.
    """
    rows = [torch.randperm(num_experts) for _ in range(t)]
    return (torch.stack(rows).float() * 0.25 - num_experts / 8).to(DEVICE, torch.float16)


def test_route_topk_fp16_logits():
    spec = ROUTERS["softmax_renorm"]
    logits = _distinct_fp16_logits(29, spec.num_experts)
    weights, ids = _route_topk(logits, spec)
    ref_w, ref_ids = route(logits, spec)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_shared", [1, 2])
def test_route_topk_appends_shared_slots(num_shared):
    spec = ROUTERS["deepseek_v3"]
    logits, corr = _logits(9, spec), _corr(spec)
    weights, ids = _route_topk(logits, spec, corr, num_shared=num_shared)
    ref_w, ref_ids = route(logits, spec, corr)
    k = spec.top_k
    assert weights.shape == (9, k + num_shared)
    assert torch.equal(ids[:, :k].long(), ref_ids)
    torch.testing.assert_close(weights[:, :k], ref_w, rtol=1e-5, atol=1e-6)
    expected_shared = torch.arange(spec.num_experts, spec.num_experts + num_shared, device=DEVICE)
    assert torch.equal(ids[:, k:].long(), expected_shared.expand(9, -1))
    assert torch.all(weights[:, k:] == 1.0)


def test_route_topk_rejects_bad_input():
    spec = ROUTERS["softmax_top2"]
    with pytest.raises(ValueError, match="logits"):
        _route_topk(torch.randn(3, 5, device=DEVICE), spec)


def _check_alignment(ids: torch.Tensor, num_experts: int, block_m: int):
    aligned = _align(ids, num_experts, block_m)
    flat = ids.reshape(-1).long().cpu()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    used = int(aligned.num_padded.item())  # host read in the test only
    assert torch.equal(aligned.expert_counts.long().cpu(), counts)
    assert used == int(padded.sum())
    bound = flat.numel() + min(num_experts, flat.numel()) * (block_m - 1)
    assert used <= aligned.sorted_slot_ids.numel() and aligned.sorted_slot_ids.numel() <= bound + block_m
    sorted_ids = aligned.sorted_slot_ids.cpu()
    blocks = aligned.block_expert_ids.cpu()
    start = 0
    for e in range(num_experts):
        seg = sorted_ids[start:start + padded[e]]
        expected = torch.nonzero(flat == e).view(-1).int()  # ascending slot order
        assert torch.equal(seg[:counts[e]], expected), f"expert {e}"
        assert torch.all(seg[counts[e]:] == flat.numel()), "padding rows must hold the sentinel"
        assert torch.all(blocks[start // block_m:(start + padded[e]) // block_m] == e)
        start += int(padded[e])
    active = set(blocks[: used // block_m].tolist())
    assert active == set(torch.nonzero(counts).view(-1).tolist()), "empty experts must own no block"
    return aligned


@pytest.mark.parametrize(
    "t,k,num_experts,block_m",
    [(1, 1, 1, 16), (1, 8, 64, 16), (37, 3, 8, 16), (23, 2, 64, 32), (100, 9, 17, 64)],
)
def test_align_tokens_by_expert(t, k, num_experts, block_m):
    ids = torch.randint(0, num_experts, (t, k), dtype=torch.int32, device=DEVICE)
    _check_alignment(ids, num_experts, block_m)


def test_align_with_many_empty_experts():
    ids = torch.tensor([[3, 5], [5, 3], [3, 9]], dtype=torch.int32, device=DEVICE)
    aligned = _check_alignment(ids, 16, 16)
    assert int(aligned.num_padded.item()) == 3 * 16


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss", "softmax_renorm"])
@pytest.mark.parametrize("t", [1, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_topk_gpu_low_precision_logits(name, t, dtype):
    spec = ROUTERS[name]
    # Distinct logits per row (multiples of 1/4, exact in bf16): no ties, so the
    # selection order is defined and must match the reference exactly.
    ranks = torch.stack([torch.randperm(spec.num_experts) for _ in range(t)]).to(DEVICE)
    logits = ((ranks.float() - spec.num_experts / 2) / 4).to(dtype)  # [T, E]
    corr = _corr(spec)
    weights, ids = _route_topk(logits, spec, corr)
    ref_w, ref_ids = route(logits, spec, corr)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)
