"""Scalar TIR expressions both kernel modules (llvm, cuda) build their epilogues from.

One `ScalarOps` per KernelKey: widening to fp32 and narrowing back to the kernel dtype,
the optional biases (a zero constant when the layer has none, so the kernels need no
second variant), and the gated activation. The TVMScript parser calls these at parse
time, so they must stay plain Python functions of TIR expressions.
"""

from __future__ import annotations

from moecc.backends.tvm.activation import gated_activation
from moecc.backends.tvm.key import KernelKey


class ScalarOps:
    def __init__(self, key: KernelKey):
        from tvm import tirx

        self._tirx = tirx
        self._key = key

    def f32(self, v):
        return self._tirx.Cast("float32", v) if self._key.dtype != "float32" else v

    def to_dt(self, v):
        return self._tirx.Cast(self._key.dtype, v) if self._key.dtype != "float32" else v

    def gate_up_bias(self, bias, e, g, n):
        return self.f32(bias[e, g, n]) if self._key.gate_up_bias else self._tirx.const(0.0, "float32")

    def down_bias(self, bias, e, k):
        return self.f32(bias[e, k]) if self._key.down_bias else self._tirx.const(0.0, "float32")

    def act(self, gate, up):
        return gated_activation(gate, up, self._key.act)


def nibble_order(column, half: int):
    """Where column `column` sits in the int4 kernels' activation order (ints or TIR
    expressions): inside each chunk of 2 * half columns the even columns come first, then
    the odd ones, matching `half` packed bytes whose low nibbles hold the even columns.
    op.int4_ordered applies the same order to torch tensors."""
    return (column // (2 * half)) * (2 * half) + (column % 2) * half + (column % (2 * half)) // 2


def llvm_prefetch(buffer, *index):
    """llvm.prefetch(address, read, keep in all cache levels, data cache) of buffer[index]; it
    never faults, so prefetching past a row's end (into the next row) is harmless."""
    from tvm.script import tirx as T

    return T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(buffer[index]),
                              T.int32(0), T.int32(3), T.int32(1))
