"""The roofline floor of one MoE layer, and the two ceilings it is built from.

For a layer with U distinct experts hit by M tokens (ARCHITECTURE.md):

    bytes = U * 3 * N * K * bytes_per_weight + activations in and out (2 * M * K * bytes)
    flops = 2 * M * top_k * 3 * N * K
    floor = max(bytes / BW, flops / PEAK)

BW is a device-to-device copy (bytes read + bytes written per second) and PEAK a large
dense matmul in the benchmark dtype, both measured on the same device in the same run as
the kernels: absolute rates drift between runs and machines, fractions of the floor don't.
Achieved performance is reported as floor / measured time (1.0 = at the floor).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moecc.roofline import moe_layer_traffic

from moecc.shapes import MoEShape
from .timing import time_fn


@dataclass(frozen=True)
class Ceilings:
    """Rates measured in this run: bytes/s of a copy (read + write), flop/s of a matmul."""

    copy_bandwidth: float  # bytes per second
    matmul_peak: float  # flop per second
    device: str = ""
    dtype: str = "bf16"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["copy_bandwidth_GBps"] = self.copy_bandwidth / 1e9
        d["matmul_peak_TFLOPs"] = self.matmul_peak / 1e12
        return d


@dataclass(frozen=True)
class Floor:
    """The floor of one (shape, M) point and which ceiling sets it."""

    bytes: float
    flops: float
    memory_s: float  # bytes / BW
    compute_s: float  # flops / PEAK

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def floor(shape: MoEShape, tokens: int, dtype: torch.dtype, distinct_experts_hit: int,
          ceilings: Ceilings) -> Floor:
    """The roofline floor for `tokens` (M) tokens that hit `distinct_experts_hit` (U) experts."""
    if not 0 <= distinct_experts_hit <= shape.num_experts:
        raise ValueError(f"U={distinct_experts_hit} must be in [0, {shape.num_experts}]")
    elem = torch.empty((), dtype=dtype).element_size()
    total_bytes, flops = moe_layer_traffic(tokens, shape.top_k, shape.intermediate_size, shape.hidden_size,
                                           distinct_experts_hit, elem, elem)
    return Floor(total_bytes, flops, total_bytes / ceilings.copy_bandwidth, flops / ceilings.matmul_peak)


def measure_copy_bandwidth(device: torch.device | str, nbytes: int | None = None) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written.

    The buffers (1 GiB on a GPU, far larger than L2) hold random bits, not zeros.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.randint(-(2 ** 15), 2 ** 15 - 1, (nbytes // 2,), dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, flush_l2=False, target_ms=200).median_ms
    return 2 * nbytes / (ms * 1e-3)


def measure_matmul_peak(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                        sizes: tuple[int, ...] | None = None) -> float:
    """Best dense matmul rate (flop/s) over square sizes: the compute ceiling."""
    device = torch.device(device)
    if sizes is None:
        sizes = (4096, 8192) if device.type == "cuda" else (256, 512)
    best = 0.0
    for n in sizes:
        gen = torch.Generator(device=device).manual_seed(n)
        a = torch.randn(n, n, dtype=dtype, device=device, generator=gen)
        b = torch.randn(n, n, dtype=dtype, device=device, generator=gen)
        ms = time_fn(lambda: torch.mm(a, b), device, flush_l2=False, target_ms=200).median_ms
        best = max(best, 2.0 * n ** 3 / (ms * 1e-3))
    return best


def measure_ceilings(device: torch.device | str, dtype: torch.dtype) -> Ceilings:
    """Both ceilings, measured now on `device`."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Ceilings(measure_copy_bandwidth(device), measure_matmul_peak(device, dtype), name,
                    dtype_name(dtype))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
