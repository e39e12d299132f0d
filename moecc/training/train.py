"""Train one of moecc's shipped byte-level MoE models on the standard library (seeded).

    python -m moecc.training.train qwen3-moe-stdlib --out moecc/trained/qwen3-moe-stdlib
    python -m moecc.training.train deepseek-v3-stdlib --out /tmp/ds --steps 5     # smoke run

Writes to --out: config.json + model.safetensors (fp32, `AutoModelForCausalLM.from_pretrained`
loads it) and train_log.json (seed, steps, time, losses, versions). The card (CARD.md:
held-out bits per byte, unigram baseline, load entropy) is written by
`python -m moecc.training.card DIR`. Same seed, same library sources and same torch
build give the same weights; other torch builds or thread counts may differ in the last bits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from moecc.training.corpus import BatchSampler, stdlib_documents, training_streams
from moecc.training.recipes import RECIPES, Recipe, get_recipe


def build_untrained(recipe: Recipe, experts_implementation: str = "grouped_mm"):
    """The recipe's transformers model with its seeded initial weights, in training mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(recipe.model_type, **recipe.config)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.set_experts_implementation(experts_implementation)
    return model.train()


def _lr_at(step: int, recipe: Recipe, steps: int) -> float:
    # Linear warm-up, then cosine decay to a tenth of the peak.
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class _CorrectionBiasBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing: count each router's top-k choices during
    a step, then move its score-correction bias towards under-used experts."""

    def __init__(self, model, speed: float):
        self.speed = speed
        self.routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        self.counts = {id(r): torch.zeros(r.e_score_correction_bias.numel()) for r in self.routers}
        self.handles = [r.register_forward_hook(self._record) for r in self.routers]

    def _record(self, module, args, output):
        indices = output[2]  # [T, top_k] chosen experts
        self.counts[id(module)] += torch.bincount(indices.reshape(-1), minlength=self.counts[id(module)].numel())

    @torch.no_grad()
    def update(self) -> None:
        for r in self.routers:
            load = self.counts[id(r)]
            r.e_score_correction_bias += self.speed * torch.sign(load.mean() - load)
            load.zero_()


def train(recipe: Recipe, out_dir: str, *, steps: int | None = None, threads: int = 1,
          experts_implementation: str = "grouped_mm", log_every: int = 50, progress: bool = True) -> dict:
    """Train `recipe` for `steps` (default: the recipe's), save the model, return the log."""
    from rich.progress import track

    steps = recipe.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    torch.set_num_threads(threads)
    t_data = time.perf_counter()
    streams = training_streams(stdlib_documents())
    data_s = time.perf_counter() - t_data
    sampler = BatchSampler(streams, recipe.seq_len, recipe.batch, recipe.code_share, recipe.seed)
    model = build_untrained(recipe, experts_implementation)
    balancer = _CorrectionBiasBalancer(model, recipe.bias_update_speed) if recipe.bias_update_speed else None
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    losses, aux_losses = [], []
    t0 = time.perf_counter()
    for step in track(range(steps), description=recipe.name, disable=not progress):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe, steps)
        batch = sampler.next()  # [B, S+1]
        out = model(input_ids=batch[:, :-1], output_router_logits=recipe.aux_loss_coef > 0)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                                                 batch[:, 1:].reshape(-1))
        total = loss
        if recipe.aux_loss_coef > 0:
            total = loss + recipe.aux_loss_coef * out.aux_loss
            aux_losses.append(float(out.aux_loss.detach()))
        if not torch.isfinite(total):
            raise FloatingPointError(f"{recipe.name}: loss became {float(total)} at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if balancer:
            balancer.update()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = losses[-log_every:]
            print(f"{recipe.name} step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f}", flush=True)
    train_s = time.perf_counter() - t0
    tail = losses[-log_every:]
    log = {
        "model": recipe.name,
        "seed": recipe.seed,
        "steps": steps,
        "batch": recipe.batch,
        "seq_len": recipe.seq_len,
        "tokens_seen": steps * recipe.batch * recipe.seq_len,
        "train_seconds": round(train_s, 1),
        "data_seconds": round(data_s, 1),
        "tokens_per_second": round(steps * recipe.batch * recipe.seq_len / train_s, 1),
        "final_train_loss_nats": round(sum(tail) / len(tail), 4),
        "final_train_bits_per_byte": round(sum(tail) / len(tail) / math.log(2), 4),
        "loss_every_step_nats": [round(x, 4) for x in losses],
        "aux_loss_last": round(aux_losses[-1], 4) if aux_losses else None,
        "threads": threads,
        "experts_implementation": experts_implementation,
        "training_bytes": {dom: int(len(s)) for dom, s in streams.items()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "recipe_notes": recipe.notes,
        "command": " ".join(["python -m moecc.training.train"] + sys.argv[1:]),
    }
    save(model, out_dir, log)
    return log


def save(model, out_dir: str, log: dict) -> None:
    """config.json + model.safetensors (fp32) + train_log.json."""
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    for extra in ("generation_config.json",):  # not needed: the byte models stop on a length
        path = os.path.join(out_dir, extra)
        if os.path.exists(path):
            os.remove(path)
    with open(os.path.join(out_dir, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moecc.training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(RECIPES))
    p.add_argument("--out", required=True, help="folder for config.json, model.safetensors, train_log.json")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    # One thread: on a shared 2-core machine two OpenMP threads were 3-10x slower per step
    # than one (spin-waiting on a busy core); grouped_mm was the fastest experts
    # implementation on CPU (0.37 s/step vs 5.3 batched_mm, 16x256 bytes, 2026-12-02).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--experts-implementation", default="grouped_mm", choices=["eager", "grouped_mm", "batched_mm"])
    p.add_argument("--no-progress", action="store_true", help="log lines only, no progress bar")
    args = p.parse_args(argv)
    log = train(get_recipe(args.model), args.out, steps=args.steps, threads=args.threads,
                experts_implementation=args.experts_implementation, progress=not args.no_progress)
    print(f"{log['model']}: {log['steps']} steps in {log['train_seconds']} s "
          f"({log['tokens_per_second']} tokens/s), final train loss {log['final_train_loss_nats']} nats/byte "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
