"""End-to-end decode: transformers MoE models at real widths, few layers, random weights.

Models (AutoConfig.for_model with the real widths, `num_hidden_layers` layers, bf16):
    qwen3-30b-a3b-4l     Qwen3-30B-A3B: hidden 2048, 128 experts of 768, top-8, GQA 32/4
    deepseek-v2-lite-4l  DeepSeek-V2-Lite: hidden 2048, 64 experts of 1408, top-6,
                         2 shared experts, first layer dense (10944), MLA (kv_lora 512)

Variants, each greedy `generate()` at batch 1 and 32:
    eager          no compilation, transformers' default cache and experts implementation
    static         cache_implementation="static": transformers compiles the decode step
                   itself (torch.compile, Inductor, mode="reduce-overhead")
    moecc          the same static cache with CompileConfig(backend=moecc); mode
                   "reduce-overhead" first, the backend's default mode if that fails

ms per decode step: a logits processor records a CUDA event at every step (no extra
host synchronisation); the median interval after the first few steps. Compilation happens
in a warm-up generate() of the same length, so the timed call reuses its graphs.

Weight-streaming floor per step: bytes of every weight a decode step reads (all
non-expert weights, B rows of the embedding table, and per MoE layer the distinct experts
the step's routing selects, averaged over the steps of an eager run) / copy bandwidth
measured in the same run. The KV cache is not counted (short contexts).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

MODELS: dict[str, tuple[str, dict]] = {
    "qwen3-30b-a3b-4l": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960,
        tie_word_embeddings=False)),
    "deepseek-v2-lite-4l": ("deepseek_v2", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
        norm_topk_prob=False, routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rms_norm_eps=1e-6,
        max_position_embeddings=163840, tie_word_embeddings=False)),
}
# CPU-sized widths for smoke runs: same structure, same expert counts.
_TINY = {
    "qwen3_moe": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "deepseek_v2": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
}
VARIANTS = ("eager", "static", "moecc")
TARGETS = {1: 2.0, 32: 3.0}  # issue 3: moecc vs static-cache autocompile on Qwen3-MoE 4 layers


class Unavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class E2EConfig:
    models: tuple[str, ...] = tuple(MODELS)
    batches: tuple[int, ...] = (1, 32)
    variants: tuple[str, ...] = VARIANTS
    num_layers: int = 4
    prompt_len: int = 16
    new_tokens: int = 32
    skip_steps: int = 4  # intervals dropped before the median (cudagraph warm-up/recording)
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    tiny: bool = False
    seed: int = 0
    deadline: float = float("inf")
    # A variant is started only with this much time left before the deadline: a compile
    # cannot be interrupted, and one started at the deadline would run past it.
    reserve_compiled_s: float = 75.0
    reserve_eager_s: float = 10.0
    moecc_options: tuple[tuple[str, object], ...] = ()  # extra moecc options, e.g. (("kernel_backend", "triton"),)
    compile_all_devices: bool = False  # let generate() compile on a CPU too (smoke tests only)


def build_model(name: str, device: str, dtype: torch.dtype, num_layers: int = 4, tiny: bool = False):
    """A transformers causal LM with the named model's widths and random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = MODELS[name]
    kwargs = {**kwargs, **(_TINY[model_type] if tiny else {}), "num_hidden_layers": num_layers}
    config = AutoConfig.for_model(model_type, **kwargs)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _experts_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def _num_experts(module: torch.nn.Module) -> int:
    return int(getattr(module, "num_experts", None) or next(module.parameters()).shape[0])


def weight_bytes_per_step(model, batch: int, experts_hit: list[float]) -> float:
    """Bytes of weights one decode step reads, given the mean distinct experts hit per MoE layer."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    moe = _experts_modules(model)
    for module, hit in zip(moe, experts_hit):
        module_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        total += hit / _num_experts(module) * module_bytes - module_bytes
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight is not emb:  # an untied table is read only at B rows
        total -= emb.numel() * emb.element_size() - batch * emb.shape[1] * emb.element_size()
    return float(total)


def expert_bytes_per_step(model, experts_hit: list[float]) -> float:
    """The part of weight_bytes_per_step that is routed experts' weights."""
    return float(sum(hit / _num_experts(module) * sum(p.numel() * p.element_size() for p in module.parameters())
                     for module, hit in zip(_experts_modules(model), experts_hit)))


def routing_stats(model, input_ids, attention_mask, steps: int = 8) -> list[float]:
    """Mean distinct experts selected per decode step, per MoE layer (eager run with hooks)."""
    batch = input_ids.shape[0]
    moe = _experts_modules(model)
    counts: list[list[int]] = [[] for _ in moe]

    def hook(i):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
            if hidden.shape[0] == batch:  # a decode step (prefill has B * prompt rows)
                counts[i].append(int(torch.unique(ids).numel()))
        return pre

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(moe)]
    try:
        _generate(model, input_ids, attention_mask, steps, disable_compile=True)
    finally:
        for h in handles:
            h.remove()
    return [statistics.mean(c) if c else float(_num_experts(m)) for c, m in zip(counts, moe)]


class _StepClock:
    """A logits processor that timestamps every decode step without synchronising."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())
        return scores

    def intervals_ms(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _generate(model, input_ids, attention_mask, new_tokens: int, clock: Optional[_StepClock] = None, **kw):
    from transformers import LogitsProcessorList

    return model.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                          logits_processor=LogitsProcessorList([clock] if clock else []), **kw)


def moecc_backend():
    """The moecc backend: by name when its entry point is installed, else the callable
    (a source checkout run with PYTHONPATH=. has no entry points; nothing is registered)."""
    try:
        from torch._dynamo.backends.registry import lookup_backend

        lookup_backend("moecc")
        return "moecc"
    except Exception:  # noqa: BLE001 - not installed: fall through to the module
        pass
    try:
        from moecc.backend import moecc_backend as fn
    except ImportError as exc:
        raise Unavailable(f"moecc backend not importable: {exc}") from exc
    return fn


def _new_compile_report():
    """A moecc.CompileReport for the backend to fill, or None if this moecc has none."""
    try:
        from moecc.capture.report import CompileReport
    except ImportError:
        return None
    return CompileReport()


def _variant_kwargs(variant: str, mode: Optional[str], cfg: E2EConfig, report=None) -> dict:
    if variant == "eager":
        return {"disable_compile": True}
    from transformers import CompileConfig

    if variant == "static":
        if not cfg.compile_all_devices:
            return {"cache_implementation": "static"}  # generate()'s own default compile config
        compile_config = CompileConfig()
    else:
        # torch.compile refuses mode= next to options=: moecc takes the mode as an option.
        options = {"mode": mode, **dict(cfg.moecc_options)}
        if report is not None:
            options["report"] = report
        compile_config = CompileConfig(backend=moecc_backend(), mode=None, options=options, fullgraph=False)
    if cfg.compile_all_devices:
        compile_config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": compile_config}


def _report_summary(report) -> dict:
    """What the moecc backend did, from its CompileReport: proof the moecc kernels ran."""
    if report is None:
        return {}
    return {"moecc_graphs": len(report.graphs), "moecc_layers_captured": len(report.captured),
            "moecc_kernels": sorted({g.kernel_backend for g in report.graphs}),
            "moecc_skipped": [f"{s.module_path}: {s.reason}" for s in report.skipped][:8]}


def time_decode(model, batch: int, variant: str, cfg: E2EConfig) -> dict:
    """ms per decode step of one variant at one batch size (warm-up call included)."""
    device = torch.device(cfg.device)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + batch)
    input_ids = torch.randint(1, vocab, (batch, cfg.prompt_len), generator=gen).to(device)
    mask = torch.ones_like(input_ids)
    modes = ("reduce-overhead", None) if variant == "moecc" else (None,)
    errors = []
    for mode in modes:
        # A fresh start for every compiled variant: as in a new process, no graphs of other
        # batch sizes or backends (which would also turn on automatic dynamic shapes).
        torch._dynamo.reset()
        report = _new_compile_report() if variant == "moecc" else None
        try:
            kw = _variant_kwargs(variant, mode, cfg, report)
            t0 = time.perf_counter()
            _generate(model, input_ids, mask, cfg.new_tokens, **kw)  # compiles where it compiles
            warmup_s = time.perf_counter() - t0
            clock = _StepClock(device)
            _generate(model, input_ids, mask, cfg.new_tokens, clock=clock, **kw)
            steps = clock.intervals_ms()[cfg.skip_steps:]
            return {"status": "ok", "step_ms": statistics.median(steps), "min_step_ms": min(steps),
                    "steps": len(steps), "warmup_s": warmup_s, "mode": mode,
                    "note": "; ".join(errors), **_report_summary(report)}
        except Unavailable as exc:
            return {"status": "unavailable", "note": str(exc)}
        except Exception as exc:  # noqa: BLE001 - record and try the next mode
            errors.append(f"mode {mode}: {type(exc).__name__}: {exc}"[:600])
    return {"status": "error", "note": "; ".join(errors)}


def run_e2e(cfg: E2EConfig, copy_bandwidth: float,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
            on_record: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """Every (model, batch, variant) record; a failure in one never ends the run."""
    records: list[dict] = []
    for name in cfg.models:
        if time.monotonic() > cfg.deadline:
            records += [{"model": name, "batch": b, "variant": v, "status": "skipped",
                         "note": "time budget used up"} for b in cfg.batches for v in cfg.variants]
            continue
        try:
            model = build_model(name, cfg.device, cfg.dtype, cfg.num_layers, cfg.tiny)
        except Exception as exc:  # noqa: BLE001
            records += [{"model": name, "batch": b, "variant": v, "status": "error",
                         "note": f"build failed: {type(exc).__name__}: {exc}"[:400]}
                        for b in cfg.batches for v in cfg.variants]
            continue
        impl = getattr(model.config, "_experts_implementation", None)
        for batch in cfg.batches:
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 7 * batch)
            ids = torch.randint(1, model.config.vocab_size, (batch, cfg.prompt_len), generator=gen).to(cfg.device)
            hit = routing_stats(model, ids, torch.ones_like(ids))
            wbytes = weight_bytes_per_step(model, batch, hit)
            floor_ms = wbytes / copy_bandwidth * 1e3
            for variant in cfg.variants:
                rec = {"model": name, "batch": batch, "variant": variant, "layers": cfg.num_layers,
                       "experts_implementation": impl, "experts_hit_per_layer": hit,
                       "weight_bytes_per_step": wbytes, "floor_ms": floor_ms}
                reserve = cfg.reserve_eager_s if variant == "eager" else cfg.reserve_compiled_s
                if time.monotonic() > cfg.deadline - reserve:
                    rec.update(status="skipped", note=f"time budget: under {reserve:.0f} s left")
                else:
                    rec.update(time_decode(model, batch, variant, cfg))
                if rec["status"] == "ok":
                    rec["fraction"] = floor_ms / rec["step_ms"]
                records.append(rec)
                log(_progress_line(rec))
                if on_record:
                    on_record(records)
        del model
        torch._dynamo.reset()
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
    return records


def _progress_line(rec: dict) -> str:
    head = f"[e2e] {rec['model']:<20} batch={rec['batch']:<3} {rec['variant']:<6}"
    if rec["status"] == "ok":
        moecc = (f"  [moecc: {rec['moecc_layers_captured']} layer(s) captured, kernels {rec['moecc_kernels']}]"
                 if "moecc_layers_captured" in rec else "")
        return (f"{head} {rec['step_ms']:8.3f} ms/step  {100 * rec['fraction']:5.1f}% of weight-streaming "
                f"floor ({rec['floor_ms']:.3f} ms)  warm-up {rec['warmup_s']:.1f} s{moecc}")
    return f"{head} {rec['status']}: {rec.get('note', '')[:300]}"


def format_e2e(records: list[dict]) -> str:
    """Model x batch rows: ms/step and fraction of floor per variant, moecc vs static."""
    if not records:
        return ""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    cell = {(r["model"], r["batch"], r["variant"]): r for r in records}
    lines = ["-- end-to-end decode: ms per step (fraction of weight-streaming floor) --",
             f"{'model':<20} {'batch':>5} {'floor ms':>9} | " + " | ".join(f"{v:>16}" for v in variants)
             + " | moecc/static"]
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in records):
        floor_ms = next((r["floor_ms"] for r in records if r["model"] == model and r["batch"] == batch
                         and "floor_ms" in r), float("nan"))
        cells = []
        for v in variants:
            r = cell.get((model, batch, v), {})
            cells.append(f"{r['step_ms']:7.3f} ({100 * r['fraction']:4.1f}%)" if r.get("status") == "ok"
                         else r.get("status", "-"))
        s, m = cell.get((model, batch, "static"), {}), cell.get((model, batch, "moecc"), {})
        ratio = (f"{s['step_ms'] / m['step_ms']:.2f}x" if s.get("status") == m.get("status") == "ok" else "-")
        target = TARGETS.get(batch) if model.startswith("qwen3") else None
        if target and ratio != "-":
            ratio += f" (target >= {target:g}x: {'met' if s['step_ms'] / m['step_ms'] >= target else 'NOT met'})"
        lines.append(f"{model:<20} {batch:>5} {floor_ms:>9.3f} | " + " | ".join(f"{c:>16}" for c in cells)
                     + f" | {ratio}")
    return "\n".join(lines)
