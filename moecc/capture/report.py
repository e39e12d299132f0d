"""What capture found: the records a user reads and tests inspect.

A `CompileReport` is owned by the caller (pass one in options={"report": r}); the
backend appends to it for every graph it compiles. Nothing is stored globally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from moecc.spec import MoELayerSpec


@dataclass
class CapturedLayer:
    module_path: str  # e.g. "model.layers.0.mlp"
    module_class: str
    spec: MoELayerSpec
    weights: dict[str, str]  # MoEWeights field -> graph node it came from
    verified: bool
    max_token_error: Optional[float] = None  # fraction of tokens outside tolerance
    experts_implementation: str = "unknown"  # grouped_mm / batched_mm / other


@dataclass
class SkippedRegion:
    module_path: str
    module_class: str
    reason: str


@dataclass
class PassResult:
    name: str
    counters: dict[str, int]
    notes: list[str] = field(default_factory=list)


@dataclass
class GraphReport:
    """One Dynamo graph: what capture did and what each pass did."""

    captured: list[CapturedLayer] = field(default_factory=list)
    skipped: list[SkippedRegion] = field(default_factory=list)
    passes: list[PassResult] = field(default_factory=list)
    kernel_backend: str = ""
    rest_of_graph: str = ""
    eager_experts_detected: bool = False


@dataclass
class CompileReport:
    """All graphs one torch.compile produced (Dynamo may compile several)."""

    graphs: list[GraphReport] = field(default_factory=list)

    def __deepcopy__(self, memo):
        # A report is a sink shared by reference: transformers' CompileConfig deep-copies
        # torch.compile options, and the copy must still fill the caller's report.
        return self

    @property
    def captured(self) -> list[CapturedLayer]:
        return [c for g in self.graphs for c in g.captured]

    @property
    def skipped(self) -> list[SkippedRegion]:
        return [s for g in self.graphs for s in g.skipped]

    def pass_counter(self, pass_name: str, counter: str) -> int:
        return sum(p.counters.get(counter, 0) for g in self.graphs for p in g.passes if p.name == pass_name)

    def format(self) -> str:
        lines = []
        for gi, g in enumerate(self.graphs):
            lines.append(f"graph {gi}: {len(g.captured)} MoE layer(s) captured, kernels: {g.kernel_backend}, "
                         f"rest of graph: {g.rest_of_graph}")
            for c in g.captured:
                check = "verified" if c.verified else "NOT verified"
                lines.append(f"  + {c.module_path} ({c.module_class}, {c.experts_implementation}; {check})")
                lines.append(f"      {c.spec.describe()}")
            for s in g.skipped:
                lines.append(f"  - left alone: {s.module_path} ({s.module_class}): {s.reason}")
            for p in g.passes:
                counters = ", ".join(f"{k}={v}" for k, v in p.counters.items()) or "nothing to do"
                lines.append(f"  pass {p.name}: {counters}")
                lines.extend(f"      {n}" for n in p.notes)
        return "\n".join(lines) if lines else "no graphs compiled"
