"""Eager vs compiled on real text: the accuracy harness of `moecc eval` (and of later
precision / pruning work).

    result = evaluate("qwen3-moe-stdlib", options={"kernel_backend": "tvm"})
    result.domains["code"].compiled_bpb, result.overall.kl, result.layers[0].flip_rate

One model object, run twice on the same windows: as is (eager) and through
`torch.compile(model, backend="moecc", options=...)`. Per domain: bits per byte of both,
KL(eager || compiled) of the next-byte distributions (mean per predicted byte, fp64),
top-1 agreement. Per MoE layer: routing flip rate and expert load of both.

How routing is observed: a forward pre-hook on every MoE block (a module with `.gate` and
`.experts`, as transformers' MoE blocks have) records the hidden states entering it; the
hook adds no operation, so capture still sees one tensor entering the region and one
leaving it. Afterwards the block's own router (`block.gate(x)`, eager, fp32 weights)
picks the top-k experts for the eager inputs and for the compiled model's inputs. The
compiled layer routes with the reference semantics that capture verified against this
router, so this is the compiled model's routing up to exact near-ties inside a kernel;
a flip means the hidden states reaching the router moved enough to change a top-k set.
Shapes: B windows per batch, W bytes per window, T = B*W tokens, D hidden size, E experts,
k experts per token, V = 256 byte values. Bits per byte in fp32 are model properties; the unigram baseline is the entropy of each
domain's own byte histogram (the best any unigram model can do on that text).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from moecc.eval_data import domain_windows, load_texts

LN2 = math.log(2.0)


@dataclass
class DomainScore:
    """One domain (code, english, other) scored by both models."""

    domain: str
    bytes_predicted: int
    eager_bpb: float
    compiled_bpb: float
    unigram_bpb: float   # entropy of this text's own byte histogram
    kl: float            # mean KL(eager || compiled) per predicted byte, nats
    top1_agreement: float


@dataclass
class LayerRouting:
    """One MoE layer: how often routing changed, and where tokens went."""

    layer: str                 # module path, e.g. "model.layers.1.mlp"
    experts: int
    tokens: int
    flip_rate: float           # tokens whose top-k set differs between eager and compiled
    eager_load: list[float]    # fraction of routed (token, slot) pairs per expert
    compiled_load: list[float]
    eager_entropy: float       # load entropy / log(experts): 1 = uniform, 0 = one expert
    compiled_entropy: float
    cold_experts: int          # experts with < 10% of a uniform share (eager)


@dataclass
class EvalResult:
    model: str
    options: dict
    data: str
    seq_len: int
    captured_layers: int
    moe_layers: int
    domains: dict[str, DomainScore]
    overall: DomainScore       # all domains' predicted bytes pooled
    layers: list[LayerRouting]
    kernels: dict[str, int] = field(default_factory=dict)  # lower_kernels counters: layers per kernel backend
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        # NaN is written as NaN (json's default), so a broken run cannot read as a pass.
        return json.dumps(self.to_dict(), indent=1)

    @property
    def finite(self) -> bool:
        nums = [self.overall.kl, self.overall.eager_bpb, self.overall.compiled_bpb]
        nums += [d.kl for d in self.domains.values()] + [d.compiled_bpb for d in self.domains.values()]
        return all(math.isfinite(x) for x in nums)


def moe_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of each MoE block: a module with a `gate` router and `experts`."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "gate") and hasattr(m, "experts")
            and isinstance(m.gate, torch.nn.Module)]


def load_entropy(load: torch.Tensor) -> float:
    """Entropy of a load distribution over E experts divided by log(E): 1 uniform, 0 collapsed."""
    p = load / load.sum()
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum() / math.log(len(p))) if len(p) > 1 else 1.0


def unigram_bpb(ids: torch.Tensor) -> float:
    """Entropy (bits) of the byte histogram of `ids`: the best unigram model of this text."""
    counts = torch.bincount(ids.reshape(-1), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


class _RouterInputs:
    """Forward pre-hooks that keep each MoE block's input hidden states (no op added)."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.seen: dict[str, list] = {name: [] for name, _ in blocks}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in blocks]

    def _hook(self, name):
        sink = self.seen[name]

        def hook(module, args):
            sink.append(args[0])
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """{layer: [T, D]} of everything recorded since the last take; clears in place."""
        out = {}
        for name, sink in self.seen.items():
            out[name] = torch.cat([x.reshape(-1, x.shape[-1]) for x in sink]) if sink else None
            sink.clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _topk_sets(block, x: torch.Tensor) -> torch.Tensor:
    """[T, k] chosen experts, sorted per token so that equal sets compare equal; x is [T, D]."""
    indices = block.gate(x)[2]  # [T, k] experts chosen by the block's own router
    return indices.sort(dim=-1).values


def _score(eager_logits, compiled_logits, targets):
    """Sums over predicted bytes: eager NLL, compiled NLL, KL, top-1 agreements (fp64).

    logits [B, W-1, V] (positions that have a next byte), targets [B, W-1].
    """
    le = torch.log_softmax(eager_logits.double(), -1)  # [B, W-1, V]
    lc = torch.log_softmax(compiled_logits.double(), -1)
    t = targets.unsqueeze(-1)  # [B, W-1, 1]
    kl = (le.exp() * (le - lc)).sum(-1)  # [B, W-1]
    agree = (eager_logits.argmax(-1) == compiled_logits.argmax(-1)).double()
    return (float(-le.gather(-1, t).sum()), float(-lc.gather(-1, t).sum()), float(kl.sum()), float(agree.sum()))


def evaluate(model, options: dict | None = None, data: str | None = None, *, max_bytes: int | None = None,
             batch: int = 8, seq_len: int | None = None, model_name: str | None = None,
             progress: bool = True) -> EvalResult:
    """Score `model` (a built-in name, a model folder, or an nn.Module) eager and compiled.

    options: torch.compile(backend="moecc") options (JSON-able; a `report` is added).
    data: a text file or folder (default: the shipped held-out sample).
    max_bytes caps each domain; batch windows per forward; seq_len defaults to the model's
    max_position_embeddings (at most 256). The model runs in its loaded dtype.
    """
    from rich.progress import track

    import moecc
    from moecc.models import HELDOUT_DIR, build_model

    t_start = time.perf_counter()
    if isinstance(model, str):
        model_name = model_name or model
        model = build_model(model)
    model_name = model_name or type(model).__name__
    data = data or HELDOUT_DIR
    windows = domain_windows(load_texts(data), seq_len or min(256, model.config.max_position_embeddings), max_bytes)
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{model_name}: no MoE block (a module with .gate and .experts) to evaluate")
    options = dict(options or {})
    report = options.setdefault("report", moecc.CompileReport())
    recorder = _RouterInputs(blocks)
    compiled = torch.compile(model, backend="moecc", options=options)
    device = next(model.parameters()).device
    sums: dict[str, list[float]] = {}
    routes = {name: {"eager": [], "compiled": []} for name, _ in blocks}
    seconds = {"eager": 0.0, "compiled": 0.0}
    jobs = [(dom, w[i: i + batch]) for dom, w in windows.items() for i in range(0, len(w), batch)]
    try:
        with torch.no_grad():
            for dom, ids in track(jobs, description=f"eval {model_name}", disable=not progress):
                n = ids.shape[0]
                if n < batch and windows[dom].shape[0] >= batch:
                    # Pad a short last batch with earlier windows (results dropped): one input
                    # shape per window length keeps the compiled model from recompiling.
                    ids = torch.cat([ids, windows[dom][: batch - n]])
                ids = ids.to(device)
                outs = {}
                for variant, fn in (("eager", model), ("compiled", compiled)):
                    t0 = time.perf_counter()
                    outs[variant] = fn(input_ids=ids).logits[:n].float()  # [n, W, V]
                    seconds[variant] += time.perf_counter() - t0
                    for name, x in recorder.take().items():  # x: [B*W, D], padding rows dropped
                        x = x.view(ids.shape[0], ids.shape[1], -1)[:n].reshape(n * ids.shape[1], -1)
                        routes[name][variant].append(x)
                s = _score(outs["eager"][:, :-1], outs["compiled"][:, :-1], ids[:n, 1:])
                acc = sums.setdefault(dom, [0.0] * 5)
                for i, v in enumerate(s + (n * (ids.shape[1] - 1),)):
                    acc[i] += v
    finally:
        recorder.remove()
    domains = {dom: _domain_score(dom, acc, unigram_bpb(windows[dom][:, 1:])) for dom, acc in sums.items()}
    pooled = [sum(acc[i] for acc in sums.values()) for i in range(5)]
    all_ids = torch.cat([w[:, 1:].reshape(-1) for w in windows.values()])
    overall = _domain_score("all", pooled, unigram_bpb(all_ids))
    layers = [_layer_routing(name, block, routes[name]) for name, block in blocks]
    seconds = {k: round(v, 3) for k, v in seconds.items()}
    seconds["total"] = round(time.perf_counter() - t_start, 3)
    shown_options = {k: v for k, v in options.items() if k != "report"}
    # Kernels of the last graph compiled (a recompile for a short last window repeats them).
    kernels = next((dict(p.counters) for g in reversed(report.graphs) for p in g.passes
                    if p.name == "lower_kernels"), {})
    return EvalResult(model_name, shown_options, data, int(next(iter(windows.values())).shape[1]),
                      len(report.graphs[-1].captured) if report.graphs else 0, len(blocks), domains, overall,
                      layers, kernels, seconds)


def _domain_score(dom: str, acc: list[float], unigram: float) -> DomainScore:
    nll_e, nll_c, kl, agree, count = acc
    return DomainScore(dom, int(count), nll_e / count / LN2, nll_c / count / LN2, unigram, kl / count, agree / count)


def _layer_routing(name: str, block, recorded: dict) -> LayerRouting:
    with torch.no_grad():
        xe, xc = torch.cat(recorded["eager"]), torch.cat(recorded["compiled"])
        se, sc = _topk_sets(block, xe), _topk_sets(block, xc)  # [T, top_k]
    experts = int(block.gate.weight.shape[0])
    le = torch.bincount(se.reshape(-1), minlength=experts).double()
    lc = torch.bincount(sc.reshape(-1), minlength=experts).double()
    flips = (se != sc).any(-1).double().mean()
    cold = int((le / le.sum() < 0.1 / experts).sum())
    return LayerRouting(name, experts, int(se.shape[0]), float(flips), (le / le.sum()).tolist(),
                        (lc / lc.sum()).tolist(), load_entropy(le), load_entropy(lc), cold)
