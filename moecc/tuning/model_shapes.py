"""MoE shapes (E, N, K, top_k) from a model: a transformers config.json, or a built-in name.

Order: a reference-shape name (moecc/shapes.py: "qwen3-30b-a3b", ...); then
`moecc.models.load_config(name_or_path)` when that module imports (built-in tiny models
and config.json paths, via transformers); otherwise a path to a JSON file (or a folder
holding config.json) is parsed here without transformers.
Field names read, first present wins:
    E      num_experts, num_local_experts, n_routed_experts
    top_k  num_experts_per_tok, experts_per_token, moe_top_k
    K      hidden_size
    N      moe_intermediate_size, intermediate_size
A config that nests the language model (text_config) is looked into.
"""

from __future__ import annotations

import json
from pathlib import Path

FIELDS = {
    "E": ("num_experts", "num_local_experts", "n_routed_experts"),
    "top_k": ("num_experts_per_tok", "experts_per_token", "moe_top_k"),
    "K": ("hidden_size",),
    "N": ("moe_intermediate_size", "intermediate_size"),
}


def _get(cfg, name):
    if isinstance(cfg, dict):
        return cfg.get(name)
    return getattr(cfg, name, None)


def shape_from_config(cfg, origin: str = "config") -> tuple[int, int, int, int]:
    """(E, N, K, top_k) from a config dict or object; ValueError naming what is missing."""
    nested = _get(cfg, "text_config")
    if nested is not None and _get(cfg, "hidden_size") is None:
        cfg = nested
    found = {}
    for dim, names in FIELDS.items():
        for name in names:
            value = _get(cfg, name)
            if isinstance(value, int) and value > 0:
                found[dim] = value
                break
    missing = [d for d in FIELDS if d not in found]
    if missing:
        wanted = "; ".join(f"{d}: one of {', '.join(FIELDS[d])}" for d in missing)
        raise ValueError(f"{origin} is not an MoE config moecc understands; missing {wanted}")
    return found["E"], found["N"], found["K"], found["top_k"]


def shapes_from_model(name_or_path: str) -> list[tuple[str, tuple[int, int, int, int]]]:
    """[(label, shape)] for a model name or config path (one MoE shape per model)."""
    from moecc.shapes import REFERENCE_SHAPES

    for s in REFERENCE_SHAPES:
        if s.name == name_or_path:
            return [(s.name, (s.num_experts, s.intermediate_size, s.hidden_size, s.top_k))]
    try:
        from moecc.models import load_config
    except ImportError:  # the lead's loader (needs transformers) is absent: parse JSON here
        load_config = None
    if load_config is not None:
        try:
            cfg = load_config(name_or_path)
        except FileNotFoundError as exc:
            raise ValueError(f"{exc}; reference shapes: {', '.join(s.name for s in REFERENCE_SHAPES)}") from None
        return [(str(name_or_path), shape_from_config(cfg, str(name_or_path)))]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read model config {path}: {exc}") from None
        return [(path.parent.name or str(path), shape_from_config(cfg, str(path)))]
    raise ValueError(f"{name_or_path!r} is neither a config.json path nor a known model name "
                     f"({', '.join(s.name for s in REFERENCE_SHAPES)})")
