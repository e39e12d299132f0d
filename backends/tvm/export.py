"""Ahead-of-time export of the TVM MoE kernels, and loading them with only the runtime.

    export_kernels(layers, target, out_dir, arch=90, dtype="float16") -> manifest path
    load_kernels(out_dir, lib_dir=None) -> ExportedKernels

`layers` are MoELayerSpecs or reference MoEShapes (moecc.shapes; silu, no bias). For each
layer, arch and token bucket (the buckets pick the tuned config), one module is built and
written to out_dir as `<name>.so` (+ `<name>.cubin` for cuda, compiled with nvcc for that
sm: see cuda_binaries.py) and listed in `manifest.json` with its full KernelKey.
With include_runtime=True the TVM runtime libraries are copied to out_dir/lib, so the
folder alone (plus the apache-tvm-ffi wheel) runs on a machine without TVM.

`load_kernels` imports tvm_ffi, never tvm: it loads libtvm_runtime(+_cuda) (runtime_libs.py)
and the modules listed in the manifest, on first use. `ExportedKernels.moe_layer` is the
op on top of them (torch routing and alignment, as in op.py).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence, Union

from moecc.backends.tvm.activation import ActivationSpec
from moecc.backends.tvm.cache import KernelSet, cubin_path, open_module, write_atomic
from moecc.backends.tvm.config import TVMKernelConfig
from moecc.backends.tvm.key import KernelKey, TargetSpec
from moecc.spec import ExpertSpec, MoELayerSpec, RouterSpec

MANIFEST = "manifest.json"
SCHEMA = 1
DEFAULT_BUCKETS = (1, 64, 1024)
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_runtime_cuda.so")


def as_layer_spec(layer) -> MoELayerSpec:
    """A MoELayerSpec, or a reference MoEShape turned into one (silu, no bias)."""
    if isinstance(layer, MoELayerSpec):
        return layer
    return MoELayerSpec(RouterSpec(layer.num_experts, layer.top_k),
                        ExpertSpec(layer.hidden_size, layer.intermediate_size),
                        source=getattr(layer, "name", ""))


def export_kernels(
    layers: Iterable[Union[MoELayerSpec, object]],
    target: str,
    out_dir: Union[str, os.PathLike],
    *,
    arch: Union[int, Sequence[int]] = 90,
    dtype: str = "float16",
    token_buckets: Sequence[int] = DEFAULT_BUCKETS,
    include_runtime: bool = False,
) -> Path:
    """Build and write the kernels; returns the manifest's path."""
    import torch
    import tvm

    from moecc.backends.tvm.cache import store_module
    from moecc.backends.tvm.op import kernel_key
    from moecc.backends.tvm.runtime import device_key

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    archs = [arch] if isinstance(arch, int) else list(arch)
    targets = ([TargetSpec("cuda", arch=a) for a in archs] if target == "cuda"
               else [_host_llvm_target()] if target == "llvm" else None)
    if targets is None:
        raise ValueError(f"export target must be 'llvm' or 'cuda', not {target!r}")
    torch_dtype = getattr(torch, dtype)
    entries, seen = [], set()
    for layer in layers:
        spec = as_layer_spec(layer)
        bias = spec.experts.has_bias
        for tgt in targets:
            for bucket in token_buckets:
                key, source = kernel_key(spec, torch_dtype, tgt, None, bucket, bias, bias,
                                         _export_device_key(tgt, device_key))
                name = f"{key.short_name()}-{key.digest(tvm.__version__)}"
                if name not in seen:
                    seen.add(name)
                    path = out / f"{name}.so"
                    if not path.exists():
                        store_module(key, path)
                    entries.append({"file": path.name,
                                    "cubin": cubin_path(path).name if tgt.kind == "cuda" else None,
                                    "key": asdict(key), "config_source": source,
                                    "min_tokens": bucket, "layer": spec.to_json()})
                else:
                    entries[[e["file"] for e in entries].index(f"{name}.so")].setdefault("also_tokens", []).append(bucket)
    manifest = {"schema": SCHEMA, "tvm_version": tvm.__version__, "target": target, "entries": entries}
    if include_runtime:
        _copy_runtime(out / "lib", cuda=(target == "cuda"))
    path = out / MANIFEST
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    return path


class ExportedKernels:
    """The modules of an export folder, loaded on first use with only the TVM runtime."""

    def __init__(self, folder: Path, manifest: dict, lib_dir):
        self.folder = folder
        self.manifest = manifest
        self.lib_dir = lib_dir
        self.keys = [key_from_dict(e["key"]) for e in manifest["entries"]]
        self._sets: dict[int, KernelSet] = {}

    def kernels(self, index: int) -> KernelSet:
        """The KernelSet of manifest entry `index` (loads the runtime and module once)."""
        if index not in self._sets:
            import tvm_ffi

            from moecc.backends.tvm.runtime_libs import load_runtime

            key = self.keys[index]
            load_runtime(self.lib_dir, cuda=key.target.kind == "cuda")
            entry = self.manifest["entries"][index]
            self._sets[index] = open_module(self.folder / entry["file"], tvm_ffi.load_module)
        return self._sets[index]

    def select(self, spec: MoELayerSpec, dtype: str, num_tokens: int, target: TargetSpec | None = None) -> int:
        """Index of the entry for this layer and dtype (and target), largest bucket <= T."""
        e, s = spec.router.num_experts, spec.experts.num_shared
        wanted = (e + s, spec.experts.intermediate_size, spec.experts.hidden_size,
                  spec.router.top_k + s, dtype, spec.experts.activation)
        found = []  # (min_tokens, index)
        for i, (key, entry) in enumerate(zip(self.keys, self.manifest["entries"])):
            if (key.num_experts, key.n, key.k, key.top_k, key.dtype, key.act.name) != wanted:
                continue
            if target is not None and (key.target.kind, key.target.arch) != (target.kind, target.arch):
                continue
            found.append((entry["min_tokens"], i))
        if not found:
            raise KeyError(f"no exported kernel for {spec.describe()} {dtype} in {self.folder}")
        fitting = [f for f in found if f[0] <= num_tokens]
        return max(fitting)[1] if fitting else min(found)[1]

    def moe_layer(self, hidden, weights, spec: MoELayerSpec):
        """The MoE op on the exported kernels (torch routing/alignment, as op.moe_layer)."""
        from moecc.backends.reference.routing import route, router_logits
        from moecc.backends.tvm.align import with_shared_experts
        from moecc.backends.tvm.op import _DTYPE_NAMES, run_kernels

        logits = router_logits(hidden, weights.router_weight, weights.router_bias, spec.router)
        topk_w, topk_ids = route(logits, spec.router, weights.correction_bias)
        topk_w, topk_ids = with_shared_experts(topk_w, topk_ids, spec.router.num_experts, spec.experts.num_shared)
        target = None
        if hidden.is_cuda:
            import torch

            major, minor = torch.cuda.get_device_capability(hidden.device)
            target = TargetSpec("cuda", arch=major * 10 + minor)
        index = self.select(spec, _DTYPE_NAMES[weights.gate_up.dtype], hidden.shape[0], target)
        return run_kernels(self.kernels(index), self.keys[index], hidden, weights, topk_w, topk_ids)


def load_kernels(out_dir: Union[str, os.PathLike], lib_dir: Union[str, os.PathLike, None] = None) -> ExportedKernels:
    """Open an export folder (modules load lazily; lib_dir defaults to out_dir/lib if present)."""
    folder = Path(out_dir)
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("schema") != SCHEMA:
        raise ValueError(f"{folder / MANIFEST}: schema {manifest.get('schema')}, expected {SCHEMA}")
    if lib_dir is None and (folder / "lib" / "libtvm_runtime.so").exists():
        lib_dir = folder / "lib"
    return ExportedKernels(folder, manifest, lib_dir)


def key_from_dict(d: dict) -> KernelKey:
    act = d["act"]  # a NamedTuple: asdict wrote it as a list
    act = ActivationSpec(**act) if isinstance(act, dict) else ActivationSpec(*act)
    return KernelKey(**{**d, "act": act, "config": TVMKernelConfig(**d["config"]),
                        "target": TargetSpec(**d["target"])})


def _host_llvm_target() -> TargetSpec:
    from moecc.backends.tvm.runtime import target_for

    return target_for("cpu")


def _export_device_key(tgt: TargetSpec, device_key) -> str:
    if tgt.kind == "cuda":
        from moecc.devices import profiles_for_arch

        profiles = profiles_for_arch(tgt.arch)
        return profiles[0].key if profiles else f"sm{tgt.arch}"
    return device_key(tgt)


def _copy_runtime(dest: Path, cuda: bool) -> None:
    from moecc.backends.tvm.runtime_libs import find_lib_dir

    src = find_lib_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_LIBS if cuda else RUNTIME_LIBS[:1]:
        shutil.copy2(src / name, dest / name)
