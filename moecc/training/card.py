"""Write CARD.md for a trained model folder: data, training run, held-out scores, routing.

    python -m moecc.training.card moecc/trained/qwen3-moe-stdlib

Reads train_log.json (written by train.py) and measures the rest with `moecc.evaluate`
on the shipped held-out sample (reference kernels, the rest of the graph eager), so the
card's numbers come from the same harness as `moecc eval`; the full result is kept
beside it as heldout_eval.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from moecc.training.corpus import HELDOUT_MODULUS


def _size_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6


def card_text(model_dir: str, log: dict, result, config: dict, n_params: int) -> str:
    name = log["model"]
    cfg_keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
                "topk_group", "n_shared_experts", "first_k_dense_replace", "routed_scaling_factor", "q_lora_rank",
                "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "norm_topk_prob")
    arch = ", ".join(f"{k}={config[k]}" for k in cfg_keys if k in config and config[k] is not None)
    lines = [
        f"# {name}",
        "",
        f"A byte-level Mixture-of-Experts language model trained by moecc on the Python {log['python']} "
        "standard library, for testing compilation accuracy on real router behaviour. Not a useful "
        "language model beyond that.",
        "",
        f"- Architecture: transformers `{config['architectures'][0]}`; {arch}; vocabulary 256 (bytes, "
        f"`moecc.tokenizer.ByteTokenizer`); {n_params / 1e6:.2f} M parameters, stored in fp32 "
        f"({_size_mb(model_dir):.1f} MB folder).",
        "- Load: `AutoModelForCausalLM.from_pretrained(folder)` or `moecc.models.build_model(\"" + name + "\")` "
        "(which also selects the `grouped_mm` experts implementation moecc captures).",
        f"- Notes: {'; '.join(log['recipe_notes'])}.",
        "",
        "## Data",
        "",
        f"Code: every `.py` file of the stdlib (test suites and site-packages excluded), "
        f"{log['training_bytes']['code'] / 1e6:.1f} MB for training. English: docstrings of those files "
        f"(`ast.get_docstring`, 40 characters or longer) and `pydoc_data.topics`, "
        f"{log['training_bytes']['english'] / 1e6:.1f} MB for training. Held out: files whose SHA-256 of "
        f"the stdlib-relative path is 0 mod {HELDOUT_MODULUS} (moecc/training/corpus.py); a fixed sample of "
        "them ships in moecc/trained/heldout/ and is what the numbers below are measured on.",
        "",
        "## Training",
        "",
        f"- Command: `{log['command']}` (seed {log['seed']}).",
        f"- {log['steps']} steps of {log['batch']} x {log['seq_len']} bytes ({log['tokens_seen'] / 1e6:.2f} M bytes "
        f"seen), AdamW, warm-up then cosine decay; {log['train_seconds'] / 60:.1f} min on a shared 2-core CPU "
        f"({log['threads']} thread, {log['tokens_per_second']:.0f} bytes/s), torch {log['torch']}, "
        f"transformers {log['transformers']}, experts implementation {log['experts_implementation']}.",
        f"- Final training loss (mean of the last 50 steps): {log['final_train_loss_nats']:.3f} nats/byte = "
        f"{log['final_train_bits_per_byte']:.3f} bits/byte.",
        "",
        f"## Held-out bits per byte (measured {datetime.date.today().isoformat()})",
        "",
        "`moecc eval " + name + " --options '{\"kernel_backend\": \"reference\", \"rest_of_graph\": \"eager\"}'` "
        f"(windows of {result.seq_len} bytes). Unigram baseline: entropy of the text's own byte histogram, the "
        "best any unigram model can do on it.",
        "",
        "| domain | bytes | unigram | model (eager) | model (compiled, reference) |",
        "|---|---|---|---|---|",
    ]
    for d in list(result.domains.values()) + [result.overall]:
        lines.append(f"| {d.domain} | {d.bytes_predicted} | {d.unigram_bpb:.3f} | {d.eager_bpb:.3f} | "
                     f"{d.compiled_bpb:.3f} |")
    lines += [
        "",
        "## Routing on the held-out sample",
        "",
        "Load entropy = entropy of the expert load / log(experts): 1 is uniform, 0 is one expert. Cold: "
        "experts receiving under 10% of a uniform share.",
        "",
        "| layer | experts | load entropy | cold experts | busiest expert share |",
        "|---|---|---|---|---|",
    ]
    for layer in result.layers:
        lines.append(f"| {layer.layer} | {layer.experts} | {layer.eager_entropy:.3f} | {layer.cold_experts} | "
                     f"{100 * max(layer.eager_load):.1f}% |")
    return "\n".join(lines) + "\n"


def write_card(model_dir: str, progress: bool = True) -> str:
    from moecc.evaluate import evaluate
    from moecc.models import build_model

    with open(os.path.join(model_dir, "train_log.json")) as f:
        log = json.load(f)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    model = build_model(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    result = evaluate(model, {"kernel_backend": "reference", "rest_of_graph": "eager"}, model_name=log["model"],
                      progress=progress)
    with open(os.path.join(model_dir, "heldout_eval.json"), "w") as f:
        f.write(result.to_json() + "\n")
    path = os.path.join(model_dir, "CARD.md")
    with open(path, "w") as f:
        f.write(card_text(model_dir, log, result, config, n_params))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moecc.training.card", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="+")
    args = p.parse_args(argv)
    for d in args.model_dir:
        print(write_card(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
