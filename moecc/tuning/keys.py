"""What a tuning table is keyed by, and how that key becomes a file name.

A table holds the best launch configuration per token-count bucket for exactly one
    (device key, op, strategy, shape (E, N, K, top_k), dtype, compiler version).
Its file name spells that key, so tables can be shared by copying files:

    h100_sxm__triton.moe__auto__E128_N768_K2048_top8__bf16__triton-3.6.0.json

Assumptions:
- `device` is a normalised key (moecc.devices.normalise_device_key), never a raw
  marketing name, so one GPU has one spelling.
- `op` is "<compiler>.<op>" ("triton.moe", "tvm.moe"); the compiler whose version keys
  the table is the part before the first dot.
- `strategy` is "auto" (the tuner picked the fastest over every strategy allowed at each
  token count) or a KernelConfig strategy ("decode", "prefill") when a table was tuned
  for one strategy only.
- No field may contain the separator "__" (checked).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import metadata

SCHEMA_VERSION = 1
SEP = "__"
STRATEGY_AUTO = "auto"
# Distribution names whose version keys a table, by compiler prefix of the op.
COMPILER_DISTRIBUTIONS = {"triton": ("triton", "pytorch-triton"), "tvm": ("apache-tvm", "tvm")}

_FILE_RE = re.compile(
    r"^(?P<device>[^_].*?)__(?P<op>[a-z0-9_.]+)__(?P<strategy>[a-z0-9_]+)__"
    r"E(?P<E>\d+)_N(?P<N>\d+)_K(?P<K>\d+)_top(?P<top_k>\d+)__(?P<dtype>[a-z0-9_]+)__"
    r"(?P<compiler>[a-z0-9_]+)-(?P<version>[^_/]+)\.json$"
)

Shape = tuple  # (E, N, K, top_k)


@dataclass(frozen=True)
class TableKey:
    """The identity of one tuning table (see module docstring)."""

    device: str
    op: str
    strategy: str
    shape: tuple[int, int, int, int]  # (E, N, K, top_k)
    dtype: str
    version: str  # version of the compiler named by op's prefix

    def __post_init__(self) -> None:
        if len(self.shape) != 4 or not all(isinstance(v, int) and v > 0 for v in self.shape):
            raise ValueError(f"shape must be four positive ints (E, N, K, top_k), got {self.shape!r}")
        for name in ("device", "op", "strategy", "dtype", "version"):
            value = getattr(self, name)
            if not value or SEP in value or "/" in value:
                raise ValueError(f"table key field {name}={value!r} is empty or contains '{SEP}' or '/'")

    @property
    def compiler(self) -> str:
        return compiler_of(self.op)

    @property
    def shape_tag(self) -> str:
        e, n, k, top_k = self.shape
        return f"E{e}_N{n}_K{k}_top{top_k}"

    @property
    def stem(self) -> str:
        """The file name without the compiler version: all versions of one table share it."""
        return SEP.join((self.device, self.op, self.strategy, self.shape_tag, self.dtype))

    @property
    def filename(self) -> str:
        return f"{self.stem}{SEP}{self.compiler}-{self.version}.json"

    def with_version(self, version: str) -> "TableKey":
        return TableKey(self.device, self.op, self.strategy, self.shape, self.dtype, version)

    def to_dict(self) -> dict:
        e, n, k, top_k = self.shape
        return {
            "device": self.device, "op": self.op, "strategy": self.strategy,
            "shape": {"E": e, "N": n, "K": k, "top_k": top_k},
            "dtype": self.dtype, "compiler": self.compiler, "compiler_version": self.version,
        }

    @staticmethod
    def from_dict(d: dict) -> "TableKey":
        s = d["shape"]
        return TableKey(d["device"], d["op"], d["strategy"], (int(s["E"]), int(s["N"]), int(s["K"]),
                        int(s["top_k"])), d["dtype"], str(d["compiler_version"]))

    def tune_command(self) -> str:
        """The command that tunes this table on the GPU it is keyed by."""
        e, n, k, top_k = self.shape
        cmd = f"moecc autotune --shape E={e},N={n},K={k},topk={top_k} --dtype {self.dtype}"
        if self.op != "triton.moe":
            cmd += f" --op {self.op}"
        if self.strategy != STRATEGY_AUTO:
            cmd += f" --strategy {self.strategy}"
        return cmd


def parse_filename(name: str) -> TableKey | None:
    """The key spelled by a table file name, or None if the name is not a table's."""
    m = _FILE_RE.match(name)
    if not m or compiler_of(m["op"]) != m["compiler"]:
        return None
    try:
        return TableKey(m["device"], m["op"], m["strategy"],
                        (int(m["E"]), int(m["N"]), int(m["K"]), int(m["top_k"])), m["dtype"], m["version"])
    except ValueError:
        return None


def compiler_of(op: str) -> str:
    return op.split(".", 1)[0]


@functools.lru_cache(maxsize=8)
def compiler_version(compiler: str) -> str:
    """Installed version of the compiler that keys tables of `compiler` ("triton", "tvm").

    Read from package metadata (no import of the compiler). "none" when not installed.
    """
    for dist in COMPILER_DISTRIBUTIONS.get(compiler, (compiler,)):
        try:
            return metadata.version(dist).replace(SEP, "_").replace("/", "_")
        except metadata.PackageNotFoundError:
            continue
    return "none"


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """"E=128,N=768,K=2048,topk=8" (any order; top_k/topk/k accepted) -> (E, N, K, top_k)."""
    fields: dict[str, int] = {}
    aliases = {"e": "E", "n": "N", "k": "K", "topk": "top_k", "top_k": "top_k", "top-k": "top_k"}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"shape field {part!r} is not NAME=VALUE (expected E=..,N=..,K=..,topk=..)")
        name, value = (s.strip() for s in part.split("=", 1))
        canon = aliases.get(name.lower()) if name not in ("K",) else "K"
        if name == "k":  # lower-case k alone is ambiguous: the hidden size K in moecc's legend
            canon = "K"
        if canon is None:
            raise ValueError(f"unknown shape field {name!r}; expected E, N, K, topk")
        fields[canon] = int(value)
    missing = [f for f in ("E", "N", "K", "top_k") if f not in fields]
    if missing:
        raise ValueError(f"shape {text!r} lacks {missing}; expected E=..,N=..,K=..,topk=..")
    return fields["E"], fields["N"], fields["K"], fields["top_k"]
