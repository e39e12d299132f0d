"""Standard ONNX operators in torch, for the importer: one function per op type.

Covers what torch.onnx.export (dynamo, opset 18-20) emits for the transformers decoder
models moecc supports, plus the ops of the standard-op MoE decomposition; an op outside
the table is an ImportError naming it.

Shape arithmetic stays on the host: `Shape` yields `HostInts` (Python ints, or SymInts
under torch.compile), and the integer ops that exported graphs apply to shapes (Gather,
Slice, Concat, Unsqueeze, Add, Equal, Where, ...) keep them host values, so Reshape /
Expand / Range read plain ints and Dynamo traces the graph without data-dependent breaks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

ONNX_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
               9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
INT64_MAX = (1 << 63) - 1


class HostInts:
    """A small integer tensor (scalar or 1-D) held as Python ints: shape arithmetic."""

    def __init__(self, values, scalar: bool = False, dtype=torch.int64):
        self.values, self.scalar, self.dtype = list(values), scalar, dtype

    def tensor(self, device=None) -> torch.Tensor:
        t = torch.tensor(self.values, dtype=self.dtype, device=device)
        return t.reshape(()) if self.scalar else t


def ints(v) -> list:
    """Python ints of a HostInts or a (small) tensor."""
    if isinstance(v, HostInts):
        return v.values
    return [int(x) for x in v.reshape(-1).tolist()]


def tensor(v, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(v, HostInts):
        return v.tensor(like.device if like is not None else None)
    return v


def _host_binary(fn: Callable, out_dtype=None):
    """An elementwise binary op that stays on the host when both inputs are HostInts."""
    def op(a, b, **_):
        if isinstance(a, HostInts) and isinstance(b, HostInts):
            av = a.values * (len(b.values) if a.scalar and not b.scalar else 1)
            bv = b.values * (len(a.values) if b.scalar and not a.scalar else 1)
            return HostInts([fn(x, y) for x, y in zip(av, bv)], a.scalar and b.scalar, out_dtype or a.dtype)
        a_like = b if isinstance(b, torch.Tensor) else None
        b_like = a if isinstance(a, torch.Tensor) else None
        a, b = tensor(a, a_like), tensor(b, b_like)
        return fn(a, b)
    return op


def _int_div(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return int(a / b)  # ONNX integer Div truncates
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _unsqueeze(x, axes=None, **_):
    axes = ints(axes)
    if isinstance(x, HostInts) and x.scalar and axes in ([0], [-1]):
        return HostInts(x.values, False, x.dtype)
    x = tensor(x)
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(x, axes=None, **_):
    if isinstance(x, HostInts) and not x.scalar and len(x.values) == 1:
        return HostInts(x.values, True, x.dtype)
    x = tensor(x)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in ints(axes)), reverse=True):
        x = x.squeeze(a)
    return x


def _gather(data, indices, axis=0, **_):
    if isinstance(data, HostInts) and isinstance(indices, HostInts):
        picked = [data.values[i] for i in indices.values]
        return HostInts(picked, indices.scalar, data.dtype)
    data, indices = tensor(data), tensor(indices)
    axis %= data.dim()
    idx = torch.where(indices < 0, indices + data.shape[axis], indices)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1:])


def _slice(data, starts, ends, axes=None, steps=None, **_):
    starts, ends = ints(starts), ints(ends)
    axes = ints(axes) if axes is not None else list(range(len(starts)))
    steps = ints(steps) if steps is not None else [1] * len(starts)
    if isinstance(data, HostInts):
        (s, e, st), = zip(starts, ends, steps)
        return HostInts(data.values[slice(s, None if e >= INT64_MAX else e, st)], False, data.dtype)
    index = [slice(None)] * data.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise NotImplementedError("Slice with a negative step")
        index[a % data.dim()] = slice(s, None if e >= INT64_MAX else e, st)
    return data[tuple(index)]


def _concat(*xs, axis=0):
    if all(isinstance(x, HostInts) for x in xs):
        return HostInts([v for x in xs for v in x.values], False, xs[0].dtype)
    like = next(x for x in xs if isinstance(x, torch.Tensor))
    return torch.cat([tensor(x, like) for x in xs], dim=axis)


def _where(cond, a, b, **_):
    if all(isinstance(v, HostInts) for v in (cond, a, b)):
        n = max(len(v.values) for v in (cond, a, b))
        pick = lambda v, i: v.values[0] if v.scalar or len(v.values) == 1 else v.values[i]  # noqa: E731
        return HostInts([pick(a, i) if pick(cond, i) else pick(b, i) for i in range(n)],
                        cond.scalar and a.scalar and b.scalar, a.dtype)
    like = next(v for v in (cond, a, b) if isinstance(v, torch.Tensor))
    return torch.where(tensor(cond, like), tensor(a, like), tensor(b, like))


def _cast(x, to=1, **_):
    dtype = ONNX_DTYPES[to]
    if isinstance(x, HostInts) and dtype in (torch.int64, torch.int32):
        return HostInts(x.values, x.scalar, dtype)
    if isinstance(x, HostInts) and dtype == torch.bool:
        return HostInts([bool(v) for v in x.values], x.scalar, dtype)
    return tensor(x).to(dtype)


def _not(x, **_):
    if isinstance(x, HostInts):
        return HostInts([not v for v in x.values], x.scalar, torch.bool)
    return torch.logical_not(x)


def _reshape(x, shape, allowzero=0, **_):
    dims = ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return tensor(x).reshape(dims)


def _expand(x, shape, **_):
    x = tensor(x)
    dims = ints(shape)
    rank = max(len(dims), x.dim())
    dims = [1] * (rank - len(dims)) + dims
    x = x.reshape([1] * (rank - x.dim()) + list(x.shape))
    return x.expand([d if d != 1 else s for d, s in zip(dims, x.shape)])


def _range(start, limit, delta, **_):
    s, l, d = (ints(v)[0] if not (isinstance(v, torch.Tensor) and v.is_floating_point()) else v.item()
               for v in (start, limit, delta))
    dtype = start.dtype if isinstance(start, (torch.Tensor, HostInts)) else torch.int64
    return torch.arange(s, l, d, dtype=dtype)


def _shape(x, start=0, end=None, **_):
    dims = list(x.shape)
    return HostInts(dims[start:end] if end is not None else dims[start:])


def _constant_of_shape(shape, value=(0.0, torch.float32), **_):
    fill, dtype = value  # the importer turns the attribute tensor into (Python scalar, dtype)
    return torch.full(ints(shape), fill, dtype=dtype)


def _gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0, **_):
    a = a.t() if transA else a
    b = b.t() if transB else b
    y = (a @ b) * alpha if alpha != 1.0 else a @ b
    return y if c is None else y + (c * beta if beta != 1.0 else c)


def _reduce(fn):
    def op(x, axes=None, keepdims=1, noop_with_empty_axes=0, **_):
        dims = ints(axes) if axes is not None else []
        if not dims:
            return x if noop_with_empty_axes else fn(x, dim=tuple(range(x.dim())), keepdim=bool(keepdims))
        return fn(x, dim=tuple(dims), keepdim=bool(keepdims))
    return op


def _cumsum(x, axis, exclusive=0, reverse=0, **_):
    dim = ints(axis)[0]
    x = tensor(x)
    if reverse:
        x = x.flip(dim)
    y = torch.cumsum(x, dim)
    if exclusive:
        y = y - x
    return y.flip(dim) if reverse else y


def _split(x, split=None, axis=0, num_outputs=None, **_):
    if split is not None:
        return torch.split(x, ints(split), dim=axis)
    size = -(-x.shape[axis] // num_outputs)
    return torch.split(x, size, dim=axis)


def _gather_nd(data, indices, batch_dims=0, **_):
    if batch_dims:
        raise NotImplementedError("GatherND with batch_dims > 0")
    return data[tuple(tensor(indices).unbind(-1))]


def _scatter_nd(data, indices, updates, reduction="none", **_):
    if reduction != "none":
        raise NotImplementedError(f"ScatterND reduction {reduction}")
    out = data.clone()
    out[tuple(tensor(indices).unbind(-1))] = updates
    return out


def _topk(x, k, axis=-1, largest=1, sorted=1, **_):  # noqa: A002 (ONNX attribute name)
    values, idx = torch.topk(x, ints(k)[0], dim=axis, largest=bool(largest), sorted=bool(sorted))
    return values, idx


def _softmax(x, axis=-1, **_):
    return torch.softmax(x, dim=axis)


def _transpose(x, perm=None, **_):
    return x.permute(perm) if perm is not None else x.permute(*reversed(range(x.dim())))


def _einsum(*xs, equation=""):
    return torch.einsum(equation.decode() if isinstance(equation, bytes) else equation, *xs)


OPS: dict[str, Callable[..., Any]] = {
    "Add": _host_binary(lambda a, b: a + b), "Sub": _host_binary(lambda a, b: a - b),
    "Mul": _host_binary(lambda a, b: a * b), "Div": _host_binary(_int_div),
    "Max": _host_binary(lambda a, b: max(a, b) if isinstance(a, int) else torch.maximum(a, b)),
    "Min": _host_binary(lambda a, b: min(a, b) if isinstance(a, int) else torch.minimum(a, b)),
    "Equal": _host_binary(lambda a, b: a == b if isinstance(a, int) else torch.eq(a, b), torch.bool),
    "And": _host_binary(lambda a, b: a and b if isinstance(a, bool) else torch.logical_and(a, b), torch.bool),
    "LessOrEqual": lambda a, b: torch.le(tensor(a), tensor(b)),
    "Less": lambda a, b: torch.lt(tensor(a), tensor(b)),
    "Greater": lambda a, b: torch.gt(tensor(a), tensor(b)),
    "Pow": lambda a, b: torch.pow(a, tensor(b)), "Neg": lambda x: -tensor(x), "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Sin": torch.sin, "Cos": torch.cos, "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh, "Erf": torch.erf, "Relu": torch.relu, "Exp": torch.exp, "Log": torch.log,
    "Abs": torch.abs, "Softplus": torch.nn.functional.softplus, "IsNaN": torch.isnan,
    "Not": _not, "Where": _where, "Cast": _cast, "CastLike": lambda x, like: tensor(x).to(like.dtype),
    "Identity": lambda x: x, "MatMul": torch.matmul, "Gemm": _gemm, "Softmax": _softmax,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum), "ReduceMax": _reduce(torch.amax),
    "Reshape": _reshape, "Transpose": _transpose, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Concat": _concat, "Slice": _slice, "Gather": _gather, "GatherND": _gather_nd,
    "GatherElements": lambda x, i, axis=0: torch.gather(x, axis, i), "Expand": _expand, "Range": _range,
    "Shape": _shape, "CumSum": _cumsum, "Split": _split, "ScatterND": _scatter_nd,
    "ScatterElements": lambda x, i, u, axis=0, reduction="none": x.scatter(axis, i, u),
    "ConstantOfShape": _constant_of_shape, "Einsum": _einsum, "TopK": _topk,
}
