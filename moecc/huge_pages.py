"""Weights on 2 MiB pages: streaming kernels limited by memory, not by address translation.

A decode step reads every weight once. On 4 KiB pages that is one TLB miss per 4 KiB, and
in a virtual machine each miss walks two page tables (guest and host). Measured on the
2-core build VM (2026-12-03, `python -m moecc.bench.huge_pages`): torch.sum over 256 MiB
of bf16 read 5.0-6.2 GB/s on 4 KiB pages and 20.4-23.3 GB/s on 2 MiB pages; moecc's bf16
MoE layer at M = 1 ran 2.4x faster with its weights on 2 MiB pages. llama.cpp gets
large pages without asking: it maps its GGUF file, and the page cache holds large folios.

PyTorch's CPU allocator uses 4 KiB pages unless THP_MEM_ALLOC_ENABLE=1 is set before the
tensors are made; a compiler sees the weights only afterwards. `collapse` therefore asks
the kernel to rebuild the existing pages of each tensor as huge pages in place
(madvise(MADV_COLLAPSE), Linux >= 6.1): no copy in Python, no new tensor, the values and
the tensor's address unchanged. Only whole 2 MiB-aligned stretches inside a tensor can be
collapsed; the (< 2 MiB) ends stay on small pages. The kernel copies the pages it
collapses (about 1-1.5 s per GiB on the build VM, one time).

Where MADV_COLLAPSE is missing (older kernels, not Linux) or THP is disabled
(/sys/kernel/mm/transparent_hugepage/enabled = never), nothing happens and `reason` says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

HUGE_PAGE = 2 << 20  # bytes; x86-64 and arm64 (4 KiB granule) PMD size
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@dataclass
class CollapseResult:
    """What `collapse` did: bytes now on huge pages, bytes it could not move, time taken."""

    collapsed_bytes: int = 0
    failed_bytes: int = 0
    tensors: int = 0
    seconds: float = 0.0
    reason: str = ""  # why nothing was attempted ('' when it ran)
    errors: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.reason:
            return f"weights stay on 4 KiB pages: {self.reason}"
        text = (f"{self.collapsed_bytes / 2**30:.2f} GiB of {self.tensors} weight tensors on 2 MiB pages "
                f"({self.seconds:.1f} s)")
        if self.failed_bytes:
            text += f"; {self.failed_bytes / 2**30:.2f} GiB stayed on 4 KiB pages ({'; '.join(self.errors[:2])})"
        return text


def unavailable_reason() -> str:
    """Why huge pages cannot be requested here ('' when they can)."""
    if not sys.platform.startswith("linux"):
        return f"huge pages are requested through Linux's madvise; this is {sys.platform}"
    try:
        with open(THP_SETTING) as f:
            setting = f.read()
    except OSError:
        return f"{THP_SETTING} is missing (kernel without transparent huge pages)"
    if "[never]" in setting:
        return f"transparent huge pages are disabled ({THP_SETTING}: never)"
    if _libc() is None:
        return "libc not found"
    return ""


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def _aligned_span(t: torch.Tensor) -> tuple[int, int]:
    """The 2 MiB-aligned [start, end) inside t's storage (empty when it holds no whole page)."""
    storage = t.untyped_storage()
    start = storage.data_ptr()
    end = start + storage.nbytes()
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = end // HUGE_PAGE * HUGE_PAGE
    return lo, max(lo, hi)


def collapse(tensors: Iterable[torch.Tensor], min_bytes: int = HUGE_PAGE) -> CollapseResult:
    """Move the pages of every CPU tensor of at least `min_bytes` onto 2 MiB pages, in place.

    Tensors sharing a storage are handled once. Values and addresses do not change; a
    tensor whose pages cannot be collapsed (memory too fragmented, kernel without
    MADV_COLLAPSE) is left as it was and counted in `failed_bytes`.
    """
    result = CollapseResult(reason=unavailable_reason())
    if result.reason:
        return result
    libc = _libc()
    seen = set()
    t0 = time.perf_counter()
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_sparse:
            continue
        try:
            lo, hi = _aligned_span(t)
        except (RuntimeError, NotImplementedError):  # tensor subclasses without plain storage
            continue
        if hi - lo < max(min_bytes, HUGE_PAGE) or lo in seen:
            continue
        seen.add(lo)
        result.tensors += 1
        if libc.madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            result.collapsed_bytes += hi - lo
            continue
        err = ctypes.get_errno()
        result.failed_bytes += hi - lo
        if err == errno.EINVAL:
            # No MADV_COLLAPSE (Linux < 6.1): mark the range so khugepaged collapses it later.
            libc.madvise(lo, hi - lo, MADV_HUGEPAGE)
            message = "kernel without MADV_COLLAPSE (Linux < 6.1): left to khugepaged"
        else:
            message = f"madvise(MADV_COLLAPSE): {errno.errorcode.get(err, err)}"
        if message not in result.errors:
            result.errors.append(message)
    result.seconds = time.perf_counter() - t0
    return result


def huge_page_bytes(t: torch.Tensor) -> int:
    """AnonHugePages of the mappings t's storage lies in (/proc/self/smaps; 0 off Linux): an
    upper bound on t's own bytes on huge pages, since a mapping (the malloc heap) may hold
    other data too; exact for a tensor alone in its mapping."""
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return 0
    total, inside = 0, False
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < end and hi > start
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A fresh, zeroed uint8 CPU tensor of `nbytes` on huge pages where the OS gives them
    (the read-bandwidth measurement's buffer): requested before first touch, and collapsed
    after it where the first touch still got small pages (fragmented memory)."""
    import mmap

    if unavailable_reason():
        return torch.zeros(nbytes, dtype=torch.uint8)
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass
    buf = torch.frombuffer(mm, dtype=torch.uint8)  # keeps `mm` alive
    offset = (-buf.data_ptr()) % HUGE_PAGE
    buf = buf[offset:offset + nbytes]
    buf.zero_()  # first touch
    if huge_page_bytes(buf) < nbytes // 2:
        collapse([buf])
    return buf
