"""Huge pages: the weights a CPU graph streams, on 2 MiB pages (moecc/huge_pages.py says why).

Matches: CPU graphs with options.huge_pages (default True).
Needs:   the final graph (last in the pipeline: derived weights of the earlier passes,
         packed experts and linears, are get_attr tensors by then).
Does:    madvise(MADV_COLLAPSE) over every tensor of at least 2 MiB that a placeholder or
         get_attr node with users holds (weights, derived weights, the static KV cache).
Guarantees: no value, shape, address or graph node changes; where the kernel cannot
         collapse, the pages stay as they were and the report says why.
Counters: tensors, collapsed_mib, failed_mib.
"""

from __future__ import annotations

from moecc.capture.report import PassResult
from moecc.passes.context import PassContext

NAME = "huge_pages"


def run(ctx: PassContext) -> PassResult:
    if not ctx.options.huge_pages or ctx.device.type != "cpu":
        return PassResult(NAME, {"tensors": 0, "collapsed_mib": 0, "failed_mib": 0}, [])
    from moecc.huge_pages import collapse

    tensors = [ctx.value(n) for n in ctx.gm.graph.nodes if n.op in ("placeholder", "get_attr") and n.users]
    result = collapse(t for t in tensors if t is not None)
    counters = {"tensors": result.tensors, "collapsed_mib": result.collapsed_bytes >> 20,
                "failed_mib": result.failed_bytes >> 20}
    notes = [result.describe()] if result.tensors or result.reason else []
    return PassResult(NAME, counters, notes)
