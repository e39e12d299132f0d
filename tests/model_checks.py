"""Shared checks for compiled-vs-eager model tests (hidet-style `check_module`)."""

from __future__ import annotations

import torch

import moecc

# Logit tolerance relative to the largest |logit|. fp32: the MoE op sums experts in a
# different order than transformers' code -> rounding-level differences (measured ~4e-7).
# bf16: eager rounds each expert's output and the combine to bf16 while moecc accumulates
# in fp32; through a few layers that moves logits by up to ~1% of their range (measured
# 4e-3..9e-3 on the built-in models), so 3e-2 leaves margin without hiding real errors
# (a missing scaling factor or wrong expert moves them by 20-50%).
LOGIT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def moe_block_count(model) -> int:
    """Routed-MoE blocks in a transformers model: modules that own an `experts` child."""
    return sum(1 for m in model.modules() if hasattr(m, "experts") and isinstance(m.experts, torch.nn.Module))


def compile_with_report(model, **options):
    report = moecc.CompileReport()
    options.setdefault("kernel_backend", "reference")
    options.setdefault("rest_of_graph", "eager")
    compiled = torch.compile(model, backend="moecc", fullgraph=True, options={"report": report, **options})
    return compiled, report


def assert_logits_close(compiled_logits: torch.Tensor, eager_logits: torch.Tensor) -> None:
    assert compiled_logits.shape == eager_logits.shape
    assert compiled_logits.dtype == eager_logits.dtype
    assert torch.isfinite(compiled_logits).all(), "compiled logits contain NaN/inf"
    scale = eager_logits.float().abs().max()
    err = (compiled_logits.float() - eager_logits.float()).abs().max() / scale
    assert err <= LOGIT_RTOL[eager_logits.dtype], f"relative logit error {err:.3e}"


def assert_generated_logits_close(logits: torch.Tensor, expected: torch.Tensor, model_dtype: torch.dtype) -> None:
    """generate() logits (fp32 for every model dtype) against eager's: element-wise fp32
    tolerance for fp32 models; for bf16 models the model-level bound relative to the
    largest |logit| (bf16 rounding accumulates through the model)."""
    from moecc.tolerances import check_close

    if model_dtype == torch.float32:
        check_close(logits, expected)
        return
    assert torch.isfinite(logits).all()
    err = (logits - expected).abs().max() / expected.abs().max()
    assert err <= LOGIT_RTOL[torch.bfloat16], f"relative logit error {err:.3e}"


def greedy_generate(model, ids, mask, new_tokens: int, **kwargs):
    """Greedy generate() of `new_tokens` -> (sequences [B, T], logits [B, new_tokens, V])."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def moecc_compile_config(report, **options):
    """transformers CompileConfig for backend="moecc" on every device (reference op, rest of
    the graph eager unless `options` say otherwise), reporting into `report`."""
    from transformers import CompileConfig

    config = CompileConfig(backend="moecc", mode=None, fullgraph=False,
                           options={"report": report, "kernel_backend": "reference", "rest_of_graph": "eager",
                                    **options})
    config._compile_all_devices = True  # transformers compiles the decode step on GPUs only by default
    return config

