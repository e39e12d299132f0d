"""What every pass receives: the graph, options, real input values and a weight store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from moecc.options import CompileOptions
from moecc.weight_store import WeightStore


@dataclass
class PassContext:
    gm: fx.GraphModule
    options: CompileOptions
    real_values: dict[fx.Node, Any]  # placeholder/get_attr node -> real tensor
    weights: WeightStore
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def moe_nodes(self) -> list[fx.Node]:
        """Every moecc layer node in graph order, whichever backend op it is bound to."""
        from moecc.ops import OP_NAMES

        names = {f"moecc::{n}" for n in OP_NAMES.values()}
        return [n for n in self.gm.graph.nodes
                if n.op == "call_function" and getattr(n.target, "name", lambda: "")() in names]

    def value(self, node) -> Any:
        """Real tensor of a weight argument (placeholder, get_attr) or None."""
        if node is None:
            return None
        if node in self.real_values:
            return self.real_values[node]
        if node.op == "get_attr":
            obj = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        raise KeyError(f"no real value for graph node {node.name}")
