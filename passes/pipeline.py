"""The pass pipeline: an explicit, ordered list. Order matters; each pass states why.

1. expert_fusion       canonical layouts + shared experts folded (kernels need it)
2. prune_experts       options.prune_experts: drop rarely used experts (needs the canonical
                       stacks; before precision and lowering, which then see fewer experts)
3. precision_lowering  options.precision: expert stacks packed int8 / int4 (needs the
                       canonical layout; before lowering, which picks kernels by format)
4. lower_kernels       bind layers to Triton / TVM / reference ops (needs canonical layouts)
5. mla_absorb          options.kv_rewrite: MLA attention absorbed over the latent cache
                       (independent of the MoE passes; before decode_gemv, which must not
                       see the kv_b_proj expansion it erases)
6. gqa_decode          options.kv_rewrite: GQA attention over the KV cache in place, only
                       the valid slots (after mla_absorb, whose MLA attention is not GQA)
7. linear_precision    options.quantize_linears: the other linears packed like the experts
                       (after mla_absorb, which reads kv_b_proj as it is; before decode_gemv)
8. decode_gemv         CPU batch-1 decode: one-row bf16 linears as torch.mv (after capture)
9. huge_pages          CPU: the weights the graph streams moved onto 2 MiB pages in place
                       (last: it must see the derived weights every earlier pass made)
"""

from __future__ import annotations

import os

from moecc.capture.report import PassResult
from moecc.passes import (decode_gemv, expert_fusion, gqa_decode, huge_pages, linear_precision, lower_kernels,
                          mla_absorb, precision_lowering, prune_experts)
from moecc.passes.context import PassContext

PIPELINE = (expert_fusion, prune_experts, precision_lowering, lower_kernels, mla_absorb, gqa_decode,
            linear_precision, decode_gemv, huge_pages)


def run_pipeline(ctx: PassContext, graph_index: int = 0) -> list[PassResult]:
    results = []
    _dump(ctx, graph_index, "capture")
    for p in PIPELINE:
        result = p.run(ctx)
        ctx.gm.graph.lint()
        ctx.gm.recompile()
        results.append(result)
        _dump(ctx, graph_index, p.NAME)
    return results


def _dump(ctx: PassContext, graph_index: int, stage: str) -> None:
    folder = ctx.options.dump_graphs
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"graph{graph_index:02d}_{stage}.txt")
    with open(path, "w") as f:
        f.write(ctx.gm.print_readable(print_output=False))
