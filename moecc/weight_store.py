"""Derived weights made at compile time, keyed by source parameter and transform.

Passes that change weights (canonical layout, shared-expert folding, later quantisation
and pruning) compute the derived tensor once, from the real parameter tensors the backend
received, and register it on the GraphModule; the compiled graph reads the derived tensor.
The store counts what it keeps so the report can say how much memory the derived copies
cost: the originals stay alive as long as the model does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx


@dataclass
class WeightStore:
    gm: fx.GraphModule
    _made: dict[tuple, str] = field(default_factory=dict)
    derived_bytes: int = 0
    derived_tensors: int = 0
    aliased_bytes: int = 0  # original parameters now sharing a derived tensor's storage

    def tensor(self, node: fx.Node) -> torch.Tensor:
        """The derived tensor behind a get_attr node this store made."""
        return getattr(self.gm, str(node.target))

    def get_attr(self, key: tuple, make: Callable[[], torch.Tensor], hint: str) -> fx.Node:
        """A get_attr node for the derived tensor `key`, computing it on first use.

        key: (transform name, source node names...) — the same sources and transform give
        the same tensor, so two layers sharing a parameter share the derived copy.
        Insert point: the caller's `graph.inserting_before` context.
        """
        if key not in self._made:
            tensor = make().detach()
            name = f"_moecc_{hint}_{len(self._made)}"
            self.gm.register_buffer(name, tensor, persistent=False)
            sources = getattr(self.gm, "_param_name_to_source", None)
            if sources is not None:
                # AOTAutograd lifts every buffer of a Dynamo graph and asks Dynamo where it
                # came from; a constant source marks it as a static input (no copy under
                # CUDA graphs) without guarding on it.
                from torch._dynamo.source import ConstantSource

                sources[name] = ConstantSource(name)
            self._made[key] = name
            self.derived_bytes += tensor.numel() * tensor.element_size()
            self.derived_tensors += 1
        return self.gm.graph.get_attr(self._made[key])
