"""What identifies one compiled TVM MoE module: shape, dtype, activation, config, target.

`KernelKey` is the in-process cache key and, through `digest`, the on-disk file name
(together with the TVM version). Only fields that change the generated code belong here;
the token count T and the number of expert blocks are symbolic in the kernels, so one
module serves every T of a bucket (the bucket only picks the config).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from moecc.backends.tvm.activation import ActivationSpec
from moecc.backends.tvm.config import TVMKernelConfig
from moecc.spec import ACTIVATION_FORMATS, WEIGHT_FORMATS

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TargetSpec:
    """kind "llvm" (mcpu: an LLVM CPU name, "" = generic) or "cuda" (arch: 90, 89, 86 ...)."""

    kind: str
    mcpu: str = ""
    arch: int = 0

    def describe(self) -> str:
        return f"cuda sm_{self.arch}" if self.kind == "cuda" else f"llvm {self.mcpu or 'generic'}"


@dataclass(frozen=True)
class KernelKey:
    num_experts: int  # E' = routed + shared: rows of the expert stack
    n: int  # N, expert intermediate size
    k: int  # K, hidden size
    top_k: int  # k' = top_k + shared: rows combined per token
    dtype: str  # activations and weights
    act: ActivationSpec
    gate_up_bias: bool
    down_bias: bool
    config: TVMKernelConfig
    target: TargetSpec
    weight_format: str = "dense"  # "dense" | "int8" | "int4": packed expert stacks (kernels_llvm_quantized.py)
    group_size: int = 0  # quantised: values per scale along the reduction axis (0: whole row)
    activations: str = "float"  # "int8": dynamic int8 activations, integer dot products (kernels_llvm_vnni.py)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"TVM MoE kernels take dtypes {DTYPES}, not {self.dtype!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"TVM MoE kernels take weight formats {WEIGHT_FORMATS}, not {self.weight_format!r}")
        if self.activations not in ACTIVATION_FORMATS:
            raise ValueError(f"TVM MoE kernels take activations {ACTIVATION_FORMATS}, not {self.activations!r}")

    def digest(self, tvm_version: str) -> str:
        """Stable hex name for the on-disk cache: every field, the TVM version and the
        kernel code itself (so editing a kernel never loads a stale module)."""
        payload = json.dumps({"key": asdict(self), "tvm": tvm_version, "code": kernel_code_version(),
                              "schema": 1}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def short_name(self) -> str:
        return (f"E{self.num_experts}_N{self.n}_K{self.k}_top{self.top_k}_{self.dtype}_{self.act.name}"
                f"_{self.target.kind}{self.target.arch or ''}"
                + ("" if self.weight_format == "dense" else f"_{self.weight_format}g{self.group_size}")
                + ("_a8" if self.activations == "int8" else ""))


KERNEL_SOURCES = ("kernels_llvm.py", "kernels_llvm_quantized.py", "kernels_llvm_vnni.py", "kernels_llvm_fp8.py", "kernels_cuda.py", "activation.py", "config.py",
                  "tir_scalars.py")


@functools.lru_cache(maxsize=1)
def kernel_code_version() -> str:
    """Hash of the files that generate kernel code (part of every module's digest)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in KERNEL_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]
