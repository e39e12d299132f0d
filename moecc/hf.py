"""Helpers for Hugging Face transformers models."""

from __future__ import annotations

GRAPH_FRIENDLY_EXPERTS = ("grouped_mm", "batched_mm")


def use_compilable_experts(model, implementation: str = "grouped_mm"):
    """Switch a transformers MoE model from the 'eager' experts loop to one moecc can capture.

    transformers' 'eager' experts implementation graph-breaks at `nonzero`; 'grouped_mm'
    (the default in transformers 5) and 'batched_mm' trace into one graph. Returns the model.
    """
    if implementation not in GRAPH_FRIENDLY_EXPERTS:
        raise ValueError(f"implementation must be one of {GRAPH_FRIENDLY_EXPERTS}, got {implementation!r}")
    if not hasattr(model, "set_experts_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers model with selectable experts "
                        "implementations (transformers >= 5 is needed)")
    model.set_experts_implementation(implementation)
    return model
