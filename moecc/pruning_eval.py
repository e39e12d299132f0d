"""The pruning accuracy sweep behind `moecc prune-eval`: fraction removed x criterion x
calibration domain -> held-out bits per byte on every domain, KL, top-1 agreement, bytes.

    rows = prune_sweep(model, windows, fractions=(0.25, 0.5), criteria=("reap", "frequency"))

Each domain's windows are split in two: statistics are recorded (moecc.record_routing) on
the first half of the calibration domain's windows, and every point is scored on the
second half of every domain, so no point is scored on the text it was calibrated on.
Points run the eager model with the plan's experts masked (moecc.pruning.mask_experts),
which the compile pass equals by definition (tests/test_pruning.py checks it on the
trained models); KL and top-1 agreement are against the unpruned model on the same
windows. Bytes saved: removed experts x one expert's gate_up + down bytes, all layers.
Shapes: B windows per batch, W bytes per window, V = 256 byte values.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from moecc.pruning import expert_bytes, mask_experts, parse_prune_config, plan_for_model

LN2 = math.log(2.0)


@dataclass
class SweepRow:
    fraction: float          # of each layer's experts asked to be removed
    criterion: str           # reap / frequency / random ("none" for the unpruned model)
    calibration: str         # domain the statistics came from ("-" for the unpruned model)
    removed: int             # experts removed over all layers
    experts: int             # routed experts over all layers
    bytes_saved: int
    bpb: dict                # {domain: bits per byte}
    kl: dict                 # {domain: mean KL(unpruned || pruned) per byte, nats}
    top1: dict               # {domain: top-1 agreement with the unpruned model}
    notes: list


def split_windows(windows: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """{domain: [N, W]} -> (calibration halves, evaluation halves); needs N >= 2."""
    calib, held = {}, {}
    for dom, w in windows.items():
        if w.shape[0] < 2:
            raise ValueError(f"domain {dom!r} has {w.shape[0]} window(s); the sweep needs at least 2 "
                             "(one to calibrate on, one to score): give more text or a larger --max-bytes")
        half = w.shape[0] // 2
        calib[dom], held[dom] = w[:half], w[half:]
    return calib, held


def _batches(w: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [w[i: i + batch] for i in range(0, w.shape[0], batch)]


@torch.no_grad()
def _logits(model, held: dict, batch: int) -> dict[str, list[torch.Tensor]]:
    return {dom: [model(input_ids=ids).logits.float() for ids in _batches(w, batch)] for dom, w in held.items()}


def _score(base: list[torch.Tensor], pruned: list[torch.Tensor], w: torch.Tensor, batch: int):
    """(bits per byte, KL nats per byte, top-1 agreement) over a domain's evaluation windows."""
    nll = kl = agree = count = 0.0
    for lb, lp, ids in zip(base, pruned, _batches(w, batch)):
        lb, lp, t = lb[:, :-1].double(), lp[:, :-1].double(), ids[:, 1:]  # [B, W-1, V] x2, [B, W-1]
        logp, logb = torch.log_softmax(lp, -1), torch.log_softmax(lb, -1)
        nll += float(-logp.gather(-1, t.unsqueeze(-1)).sum())
        kl += float((logb.exp() * (logb - logp)).sum())
        agree += float((lb.argmax(-1) == lp.argmax(-1)).double().sum())
        count += t.numel()
    return nll / count / LN2, kl / count, agree / count


def prune_sweep(model, windows: dict[str, torch.Tensor], fractions=(0.25, 0.5),
                criteria=("reap", "frequency", "random"), batch: int = 8, seed: int = 0,
                progress=None) -> tuple[list[SweepRow], dict]:
    """All points plus the unpruned row first; returns (rows, info with timings and sizes)."""
    from moecc.evaluate import moe_blocks
    from moecc.routing_stats import record_routing

    t0 = time.perf_counter()
    calib, held = split_windows(windows)
    per_expert = expert_bytes(model)
    total_experts = sum(int(b.gate.weight.shape[0]) for _, b in moe_blocks(model))
    base = _logits(model, held, batch)
    rows = [_row(0.0, "none", "-", 0, total_experts, 0, base, base, held, batch, [])]
    stats = {dom: record_routing(model, _batches(w, batch), data=f"{dom} calibration half")
             for dom, w in calib.items()}
    for fraction in fractions:
        for criterion in criteria:
            for dom, st in stats.items():
                config = parse_prune_config({"stats": st, "keep": 1.0 - fraction, "criterion": criterion,
                                             "seed": seed})
                plan = plan_for_model(model, config)
                with mask_experts(model, plan):
                    pruned = _logits(model, held, batch)
                saved = sum(len(lp.removed) * per_expert[lp.name] for lp in plan.layers)
                notes = [f"{lp.name}: {lp.note}" for lp in plan.layers if lp.note]
                rows.append(_row(fraction, criterion, dom, plan.removed_experts, total_experts, saved, base, pruned,
                                 held, batch, notes))
                if progress:
                    progress(rows[-1])
    info = {"seconds": round(time.perf_counter() - t0, 1), "expert_bytes": per_expert,
            "calibration_windows": {d: int(w.shape[0]) for d, w in calib.items()},
            "evaluation_windows": {d: int(w.shape[0]) for d, w in held.items()},
            "window": int(next(iter(windows.values())).shape[1])}
    return rows, info


def _row(fraction, criterion, dom, removed, experts, saved, base, pruned, held, batch, notes) -> SweepRow:
    bpb, kl, top1 = {}, {}, {}
    for d, w in held.items():
        bpb[d], kl[d], top1[d] = _score(base[d], pruned[d], w, batch)
    return SweepRow(fraction, criterion, dom, removed, experts, saved, bpb, kl, top1, notes)


def rows_to_dicts(rows: list[SweepRow]) -> list[dict]:
    return [asdict(r) for r in rows]
