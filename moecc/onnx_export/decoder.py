"""A causal LM's decode step as ONNX, its KV cache as inputs and outputs, and a greedy loop over it.

    report = export_onnx_decoder(model, "decoder.onnx")    # MoE layers as com.microsoft.MoE / QMoE
    decoder = OnnxDecoder("decoder.onnx")
    result = decoder.greedy(input_ids, new_tokens=24)       # tokens [B, new_tokens], step_ms

The file's interface (the "with past" layout optimum and onnxruntime-genai use for
decoder-only models), L = the model's cache layers:
    inputs   input_ids       int64 [B, S]            the new tokens (S = prompt length at prefill, 1 at decode)
             attention_mask  int64 [B, P + S]        1 for real tokens, 0 for left padding
             past_<i>_key, past_<i>_value            the cache of layer i, [B, Hkv, P, D] (whatever the
                                                     model's DynamicCache layer holds; P = 0 at prefill)
    outputs  logits          float [B, S, V]
             present_<i>_key, present_<i>_value      [B, Hkv, P + S, D]: the next step's past
Position ids come from the mask (cumsum - 1), as transformers' generate() computes them, so
left-padded batches decode as they do there.

Everything else is `export_onnx`'s: the MoE layers are captured and exported as onnxruntime's
fused operators where they fit (standard ops otherwise), and the file is checked with
onnxruntime against eager PyTorch on one decode step of a real cache (every output,
logits and presents, relative error <= rtol) before the call returns.

Assumptions: the model is a transformers causal LM whose forward takes input_ids,
attention_mask, position_ids, past_key_values (a DynamicCache) and use_cache, and whose cache
layers hold `keys` / `values` tensors (every model moecc captures: GQA caches K and V per KV
head, MLA models in transformers 5.x their latent). Sliding-window layers keep what
transformers' DynamicCache keeps.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from moecc.onnx_export.export import ExportReport, export_onnx


def cache_argument(model: torch.nn.Module) -> str:
    """The name of `model.forward`'s cache argument (and its output field): transformers 5.x
    renamed past_key_values to cache (the old name warns until 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class DecoderWithPast(torch.nn.Module):
    """model(input_ids, attention_mask, past) -> (logits, *presents), the cache as a flat tuple of
    tensors (past_0_key, past_0_value, past_1_key, ...). The module the decoder file is exported
    from."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.cache_arg = cache_argument(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...]):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)],
                             config=self.model.config)
        s = input_ids.shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]  # [B, S]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_arg: cache})
        presents = [t for layer in getattr(out, self.cache_arg).layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """past_0_key, past_0_value, past_1_key, ... (or present_...)."""
    return [f"{prefix}_{i}_{kv}" for i in range(num_layers) for kv in ("key", "value")]


def example_step(model: torch.nn.Module, batch: int = 2, past_len: int = 5, new_len: int = 3, seed: int = 0):
    """(input_ids [B, S], attention_mask [B, P + S], past tensors) for one step after a real prefix:
    the past is the model's own cache of `past_len` random tokens, so the exported step is checked
    on the values it will see. Every dynamic dimension is >= 2 (torch.export specialises 1)."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    prefix = torch.randint(1, vocab, (batch, past_len), generator=gen).to(device)
    ids = torch.randint(1, vocab, (batch, new_len), generator=gen).to(device)
    arg = cache_argument(model)
    with torch.no_grad():
        cache = getattr(model(input_ids=prefix, use_cache=True, **{arg: DynamicCache(config=model.config)}), arg)
    past = tuple(t.clone() for layer in cache.layers for t in (layer.keys, layer.values))
    mask = torch.ones(batch, past_len + new_len, dtype=torch.int64, device=device)
    return ids, mask, past


def export_onnx_decoder(model: torch.nn.Module, path: str, precision=None, *, batch: int = 2, past_len: int = 5,
                        new_len: int = 3, **kwargs) -> ExportReport:
    """Write `model`'s decode step with its KV cache at `path` (the interface in the module
    docstring); returns export_onnx's report, checked on one step after a real cache.

    precision, kwargs (rtol, external_data, onnxruntime_ops): as export_onnx.
    batch, past_len, new_len: the example step (all dynamic in the file; keep them >= 2).
    """
    if min(batch, past_len, new_len) < 2:
        raise ValueError(f"batch, past_len and new_len must be >= 2 (torch.export bakes a size of 1 into the "
                         f"file); got {batch}, {past_len}, {new_len}")
    ids, mask, past = example_step(model, batch, past_len, new_len)
    layers = len(past) // 2
    names = ["input_ids", "attention_mask", *cache_names(layers, "past")]
    outputs = ["logits", *cache_names(layers, "present")]
    auto = torch.export.Dim.AUTO
    dims = ({0: auto, 1: auto}, {0: auto, 1: auto},  # batch and lengths dynamic; heads, widths fixed
            tuple({0: auto, t.dim() - 2: auto} for t in past))
    return export_onnx(DecoderWithPast(model).eval(), (ids, mask, past), path, precision,
                       input_names=names, output_names=outputs, dynamic_shapes=dims, **kwargs)


@dataclass
class GreedyResult:
    tokens: np.ndarray  # int64 [B, new_tokens]
    step_ms: list[float]  # one per decode step after the prefill (argmax + session.run)
    prefill_ms: float
    first_logits: np.ndarray  # float [B, V]: logits at the prompt's last position


class OnnxDecoder:
    """Greedy decoding over a file from export_onnx_decoder, in one onnxruntime session (CPU).

    threads: intra-op threads (default: torch's thread count, so a comparison with torch
    runs on the same cores)."""

    def __init__(self, path: str, threads: Optional[int] = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if [i.name for i in inputs[:2]] != ["input_ids", "attention_mask"]:
            raise ValueError(f"{path} is not a decoder file from export_onnx_decoder (inputs "
                             f"{[i.name for i in inputs[:4]]}...; expected input_ids, attention_mask, past_0_key, ...)")
        self.past_inputs = inputs[2:]
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
        self.cache_dtype = dtypes.get(self.past_inputs[0].type, np.float32) if self.past_inputs else np.float32

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length caches: every past input's static dimensions, batch B, length 0."""
        out = []
        for inp in self.past_inputs:
            shape = [batch if i == 0 else (0 if i == len(inp.shape) - 2 else d) for i, d in enumerate(inp.shape)]
            if not all(isinstance(d, int) for d in shape):
                raise ValueError(f"{inp.name} has symbolic dimensions {inp.shape} beyond batch and length")
            out.append(np.zeros(shape, dtype=self.cache_dtype))
        return out

    def greedy(self, input_ids, new_tokens: int, attention_mask=None) -> GreedyResult:
        """Prefill `input_ids` [B, P] (left padding marked by attention_mask), then `new_tokens`
        greedy steps of one token each; times every step."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        past = self.empty_past(ids.shape[0])
        names = [i.name for i in self.past_inputs]

        def run(step_ids, step_mask, past):
            out = self.session.run(None, {"input_ids": step_ids, "attention_mask": step_mask, **dict(zip(names, past))})
            return out[0][:, -1], out[1:]  # [B, V], presents

        t0 = time.perf_counter()
        logits, past = run(ids, mask, past)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        first = logits.copy()
        tokens, step_ms = [], []
        for i in range(new_tokens):
            t0 = time.perf_counter()
            tok = logits.argmax(-1)[:, None].astype(np.int64)  # [B, 1]
            tokens.append(tok)
            if i == new_tokens - 1:
                break  # the last token needs no forward
            mask = np.concatenate([mask, np.ones_like(tok)], axis=1)
            logits, past = run(tok, mask, past)
            step_ms.append((time.perf_counter() - t0) * 1e3)
        return GreedyResult(np.concatenate(tokens, axis=1), step_ms, prefill_ms, first)
