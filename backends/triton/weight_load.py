"""The one place expert-weight tiles are loaded: where quantised formats plug in.

Every expert GEMM reads its weight tile through `load_weight_tile`. Today only
WEIGHT_FORMAT == 0 ("dense": the tile is stored in the compute dtype) exists. A quantised
format adds a branch here, selected by the constexpr, that loads the packed tile plus its
scales and returns the dequantised tile in the activation dtype:

    fp8 e4m3 with 128x128 block scales (DeepSeek-V3): load fp8, multiply by the scale of
        the (n // 128, k // 128) block, cast; on sm_89+ one would instead keep fp8 for
        tl.dot and apply the scales to the accumulator (w8a8).
    int8 per-channel / int4 group-wise: load packed bytes, unpack nibbles, subtract the
        zero point, multiply by the group scale.

The GEMM kernels pass the scale pointer and strides through unchanged, so a new format
touches this module, the launch wrappers (extra pointers) and `WEIGHT_FORMATS`, not the
GEMM loop structure.
"""

from __future__ import annotations

import triton
import triton.language as tl

WEIGHT_FORMATS = {"dense": 0}


@triton.jit
def load_weight_tile(
    ptrs,  # [BLOCK_K, BLOCK_N] pointers into the expert's weight matrix
    mask,  # [BLOCK_K, BLOCK_N] in-bounds mask
    WEIGHT_FORMAT: tl.constexpr,
):
    """A weight tile in the compute dtype, zeros outside `mask`."""
    tl.static_assert(WEIGHT_FORMAT == 0, "only dense weights are implemented")
    return tl.load(ptrs, mask=mask, other=0.0)
