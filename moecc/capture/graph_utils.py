"""Small helpers over Dynamo's torch-level FX graphs: parameters, shapes, op kinds."""

from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx

_PARAM_MARKERS = ("_parameters_", "_buffers_")


def example_value(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def concrete_int(value: Any) -> int:
    """A SymInt's hint (the value seen while tracing) or a plain int."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        if hint is None:
            raise ValueError(f"symbolic size {value} has no concrete hint")
        return int(hint)
    return int(value)


def concrete_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(concrete_int(s) for s in t.shape)


def is_weight_node(node: fx.Node) -> bool:
    """A module parameter or buffer: a Dynamo-lifted placeholder or a get_attr."""
    if node.op == "get_attr":
        return True
    return node.op == "placeholder" and any(m in node.name for m in _PARAM_MARKERS)


def weight_name(node: fx.Node) -> tuple[str, str]:
    """(owner module attribute, parameter name) of a weight node.

    Dynamo names lifted parameters like
    l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_gate_up_proj_
    -> ("experts", "gate_up_proj").
    """
    if node.op == "get_attr":
        parts = str(node.target).split(".")
        return (parts[-2] if len(parts) > 1 else "", parts[-1])
    name = node.name
    cut = max(name.rfind(m) for m in _PARAM_MARKERS)
    marker = next(m for m in _PARAM_MARKERS if name.startswith(m, cut))
    param = name[cut + len(marker):].rstrip("_")
    owner = name[:cut].split("_modules_")[-1]
    return owner, param


def weight_path(node: fx.Node) -> str:
    """The module path of a weight node, for messages:
    l_self_modules_model_modules_layers_modules_0_modules_self_attn_modules_q_proj_parameters_weight_
    -> "model.layers.0.self_attn.q_proj.weight" (get_attr targets as they are)."""
    if node.op == "get_attr":
        return str(node.target)
    name = node.name
    for prefix in ("l_self_", "L_self_"):
        name = name.removeprefix(prefix)
    name = name.removeprefix("modules_")
    for marker in ("_modules_", *_PARAM_MARKERS):
        name = name.replace(marker, ".")
    return name.rstrip("_")


def call_name(node: fx.Node) -> str:
    """A readable op name for call_function / call_method nodes ("topk", "softmax")."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", None) or str(t)
        if isinstance(t, torch._ops.OpOverload):
            name = t._opname
        return name
    return ""


def is_call(node: fx.Node, *names: str) -> bool:
    return node.op in ("call_function", "call_method") and call_name(node) in names


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def descendants(roots: Iterable[fx.Node], within: set[fx.Node]) -> set[fx.Node]:
    """Nodes in `within` reachable from `roots` through data dependencies."""
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in within and user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def constant_value(value: Any, scalars: Optional[dict] = None) -> Optional[float]:
    """A Python number, or a scalar graph input (or its `.item()`) with a known value.

    With dynamic=True Dynamo lifts float module attributes (DeepSeek's
    routed_scaling_factor, GPT-OSS's alpha and limit) to 0-d tensor inputs read through
    `.item()`; `scalars` maps those inputs to the values they had at compile time.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and scalars:
        if value in scalars:
            return scalars[value]
        if is_call(value, "item") and value.args and value.args[0] in scalars:
            return scalars[value.args[0]]
    return None


def float_constant(node: fx.Node, scalars: Optional[dict] = None) -> Optional[float]:
    """The constant operand of a binary node whose other operand is a tensor, if any."""
    for a in node.args:
        c = constant_value(a, scalars)
        if c is not None:
            return c
    return None


def scalar_inputs(real_values: dict) -> dict:
    """Graph inputs that are 0-d floating CPU tensors (lifted module attributes) -> value."""
    return {node: float(v) for node, v in real_values.items()
            if node.op == "placeholder" and isinstance(v, torch.Tensor) and v.dim() == 0
            and v.is_floating_point() and v.device.type == "cpu"
            and not isinstance(v, torch._subclasses.FakeTensor)}
