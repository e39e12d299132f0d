"""`max_loss` inside the prune_experts pass: the smallest `keep` whose loss stays in bounds.

    keep, note = keep_for_loss_bound(ctx, config, groups)   # passes/prune_experts.py

The pass has no model object, only the captured graph and the real values it was called
with. So the loss is measured on that graph: its token-id input (the one 2-D integer
placeholder, e.g. input_ids [B, W]) is fed windows of the data, B at a time and W bytes
wide (the graph is specialised to its example shape), the logits are its [B, W, V]
floating output, and each moecc MoE layer node is run by the reference definition with
the candidate plan's experts masked on the full weights (route with
RouterSpec.masked_experts, sum the selected experts of the unpruned stack): exactly what
the pruned layer computes (tests/passes/test_prune_experts.py). Candidates are tried as
moecc.pruning.keep_for_max_loss tries them (7/8, 3/4, ..., 1/4), stopping at the first
whose mean next-byte loss rises by more than max_loss nats over the unpruned graph.

Data: the config's "data" (a text file or folder, or an [N, W] token-id tensor), else
the path the statistics name (`moecc calibrate --data PATH` records "PATH (...)"). Text is
read as bytes, the trained byte-level models' tokens; other models pass token ids. With
text, the windows after the bytes `moecc calibrate --max-bytes` recorded on are held out
and used; without such text the loss is measured on the calibration text itself (the
note says which). At most MAX_WINDOWS windows per domain, to bound the cost (7 graph
runs over them at most).
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional

import torch
import torch.fx as fx

from moecc.pruning import PruneConfig, PruningError, plan_pruning

CANDIDATES = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
MAX_WINDOWS = 16  # per domain


def keep_for_loss_bound(ctx, config: PruneConfig, groups: dict) -> tuple[float, str]:
    """(the smallest candidate keep within config.max_loss, a note saying what was measured)."""
    from moecc.spec import MoELayerSpec

    token_input = _token_input(ctx)
    b, w = token_input[1].shape
    windows, where = _windows(config, w)
    batches = [windows[i: i + b] for i in range(0, windows.shape[0] - b + 1, b)]  # [B, W] each
    if not batches:
        raise PruningError(f"max_loss: the data has {windows.shape[0]} window(s) of {w} tokens, the graph takes "
                           f"{b} per call; give more data")
    specs = {node: MoELayerSpec.from_json(node.args[-1]) for node in ctx.moe_nodes()}
    base = _loss(ctx, token_input[0], batches, specs, {})
    best, losses = 1.0, []
    for keep in CANDIDATES:
        trial = PruneConfig(config.stats, keep, config.criterion, config.protect_super_experts, config.seed,
                            config.stats_source)
        plan = plan_pruning(config.stats, trial, groups)
        masked = {node: plan.layer(spec.source).removed for node, spec in specs.items()
                  if plan.layer(spec.source) is not None}
        loss = _loss(ctx, token_input[0], batches, specs, masked)
        losses.append(f"{keep:g}: {loss - base:+.4f}")
        if not loss - base <= config.max_loss:  # NaN stops too
            break
        best = keep
    n = sum(x.shape[0] for x in batches)
    return best, (f"max_loss {config.max_loss:g} nats/token: keep {best:g} chosen on {n} windows of {w} tokens "
                  f"({where}); loss {base:.4f} unpruned, rise by keep {', '.join(losses)}")


def _token_input(ctx) -> tuple[fx.Node, torch.Tensor]:
    """The graph's one token-id placeholder and its real value [B, W]."""
    found = [(n, v) for n, v in ctx.real_values.items() if n.op == "placeholder" and isinstance(v, torch.Tensor)
             and v.dim() == 2 and not v.is_floating_point() and v.dtype != torch.bool]
    if len(found) != 1:
        raise PruningError(f"max_loss: the captured graph has {len(found)} 2-D token-id inputs, the loss needs "
                           "exactly one (input_ids); choose 'keep' instead (moecc.pruning.keep_for_max_loss)")
    return found[0]


def _windows(config: PruneConfig, width: int) -> tuple[torch.Tensor, str]:
    """[N, W] token ids to measure on, and where they came from."""
    data = config.data
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.shape[1] != width or data.is_floating_point():
            raise PruningError(f"max_loss: 'data' must be token ids [N, {width}] (the graph's window), "
                               f"got {data.dtype} {tuple(data.shape)}")
        return data[: MAX_WINDOWS * 4].long(), f"{data.shape[0]} given windows"
    path, held_out_from = data, None
    if path is None:
        match = re.match(r"^(.*) \([^()]*\)$", config.stats.data or "")
        path = match.group(1) if match else config.stats.data
        held_out_from = config.stats.extra.get("max_bytes") if isinstance(config.stats.extra, dict) else None
        if not path or not os.path.exists(path):
            raise PruningError(f"max_loss: the statistics name no data path that exists here ({config.stats.data!r}); "
                               "give 'data' (a text file or folder, or token ids [N, W])")
    from moecc.eval_data import EvalDataError, domain_windows, load_texts

    try:
        per_domain = domain_windows(load_texts(path), width)
    except (EvalDataError, OSError) as exc:
        raise PruningError(f"max_loss: cannot read data {path!r}: {exc}") from exc
    chosen, held = [], held_out_from is not None
    for dom, w in per_domain.items():
        if w.shape[1] != width:
            continue  # a domain shorter than one window
        rest = w[math.ceil(held_out_from / width):] if held_out_from is not None else w
        if held_out_from is not None and rest.shape[0] == 0:
            held, rest = False, w
        chosen.append(rest[:MAX_WINDOWS])
    if not chosen:
        raise PruningError(f"max_loss: {path!r} has no window of {width} bytes; give more text")
    where = f"{path}, " + ("held out: after the calibrated bytes" if held else
                           "the calibration text itself" if data is None else "given text")
    return torch.cat(chosen), where


@torch.no_grad()
def _loss(ctx, token_node: fx.Node, batches: list[torch.Tensor], specs: dict, masked: dict) -> float:
    """Mean next-token cross-entropy (nats) of the graph over batches, experts masked."""
    placeholders = [n for n in ctx.gm.graph.nodes if n.op == "placeholder"]
    total, count = 0.0, 0
    for ids in batches:
        args = [ids.to(ctx.real_values[n].device) if n is token_node else ctx.real_values[n] for n in placeholders]
        outputs = _MaskedRun(ctx.gm, specs, masked).run(*args)
        logits = _logits(outputs, ids)  # [B, W, V]
        logits = logits[:, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1).to(logits.device), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


def _logits(outputs, ids: torch.Tensor) -> torch.Tensor:
    flat = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    for t in flat:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 3 and t.shape[:2] == ids.shape \
                and t.shape[2] > int(ids.max()):
            return t
    raise PruningError("max_loss: the captured graph returns no logits [B, W, V] for its token ids; choose 'keep'")


class _MaskedRun(fx.Interpreter):
    """The graph, with each MoE layer node in `masked` computed by the reference definition
    with those experts masked (router ids; the unpruned stacks)."""

    def __init__(self, gm, specs: dict, masked: dict):
        super().__init__(gm)
        self.specs, self.masked = specs, masked

    def run_node(self, n: fx.Node):
        if n not in self.masked or not self.masked[n]:
            return super().run_node(n)
        import dataclasses

        from moecc.backends.reference.experts import canonical_expert_weights
        from moecc.backends.reference.moe_layer import combine_experts
        from moecc.backends.reference.routing import route, router_logits
        from moecc.weights import MoEWeights

        args, _ = self.fetch_args_kwargs_from_env(n)
        x, w, spec = args[0], MoEWeights(*args[1:-1]), self.specs[n]
        router = dataclasses.replace(spec.router, masked_experts=tuple(self.masked[n]))
        logits = router_logits(x, w.router_weight, w.router_bias, spec.router)  # [T, E]
        weights, ids = route(logits, router, w.correction_bias)  # [T, k] x2, router ids
        return combine_experts(x, weights, ids, canonical_expert_weights(w, spec.experts), spec, w.shared_expert_gate)


def data_option(value) -> Optional[object]:
    """options["prune_experts"]["data"], checked: None, a path, or token ids [N, W]."""
    if value is None or isinstance(value, str) or (isinstance(value, torch.Tensor) and value.dim() == 2):
        return value
    raise PruningError(f"'data' must be a text file or folder, or token ids [N, W]; got {type(value).__name__}")
