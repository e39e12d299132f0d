"""llama.cpp as a peer in the CPU decode benchmark: the same weights, run by llama.cpp.

A transformers `Qwen3MoeForCausalLM` (fp32 or bf16, random or trained weights) is written
as a GGUF file of llama.cpp's architecture `qwen3moe`, optionally quantised by llama.cpp
itself (Q8_0, Q4_K_M), and decoded greedily through llama-cpp-python: at batch 1 with its
`Llama` class, at batch B > 1 through the low-level batch API (one context, B sequences,
one token per sequence per step). The
benchmark harness (bench/cpu_decode.py) imports this module; nothing else in moecc does.

Optional: needs `pip install llama-cpp-python gguf`. Both are imported only inside the
functions that use them; a missing one raises `LlamaCppUnavailable` naming the package.

What llama.cpp's qwen3moe computes, and so what this writer assumes of the model (read in
llama.cpp src/models/qwen3moe.cpp and src/llama-graph.cpp `build_moe_ffn`):
  - routing: softmax over all E router logits, top-k, then the k weights are always
    renormalised to sum 1 (the graph passes norm_w=true; no GGUF key turns it off). That
    is transformers' `norm_topk_prob=True`; a model with False is refused.
  - every layer is an MoE layer (no dense `mlp_only_layers`), no attention biases, no
    sliding window, plain RoPE (NEOX/rotate-half layout, so q/k rows are not permuted).
  - q_norm / k_norm are RMS norms over head_dim, applied before RoPE, as in transformers.
Tensor types follow llama.cpp's own converter: 1-D tensors (norms) and the router
(`ffn_gate_inp`) in F32, every other matrix in F16 (or F32 with dtype="f32").

Vocabulary: the file says `tokenizer.ggml.model = "none"` with `qwen3moe.vocab_size`, a
vocabulary llama.cpp loads as V placeholder tokens. Token ids go in and come out; there is
no text, which is all a benchmark on random weights needs.

AMX (found 2026-12-02 on this project's CPU machine, a 2-core Xeon VM with AMX, with
llama-cpp-python 0.3.36 built from source, GGML_NATIVE, gcc 12): llama.cpp's AMX kernels
die with SIGILL (`tilezero` in tinygemm_kernel_amx<block_q8_0>) on the first multi-token
batch of a Q8_0 model, with or without torch imported, while a standalone C program
doing ldtilecfg + tilezero runs fine on the same machine. This matches llama.cpp PR
#26954 (tile configuration / per-thread AMX permission). F16 files never take that path.
`decode_ms_per_step` refuses a file with AMX-kernel tensor types on a build reporting
AMX_INT8 unless `allow_amx=True`. A build without AMX runs them; checked by rebuilding
libggml-cpu alone with these flags (the pip command below passes the same flags to the
whole build; it was not run here):
    CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
      -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" \
      pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36

Shapes: E = experts, N = expert width (moe_intermediate_size), K = hidden size,
V = vocabulary. GGUF lists dimensions innermost first, the reverse of torch/numpy: a
numpy array [E, N, K] is the GGML tensor ne = {K, N, E}.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

# llama.cpp file types by the names its `llama-quantize` tool uses.
QUANT_TYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
WRITE_DTYPES = {"f16": np.float16, "f32": np.float32}


class LlamaCppUnavailable(RuntimeError):
    """llama-cpp-python or gguf is missing, or the installed llama.cpp build cannot run the
    file (AMX, see above); the message says what to install."""


def _import_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise LlamaCppUnavailable("the llama.cpp peer needs the gguf package: pip install gguf") from exc
    return gguf


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppUnavailable(
            "the llama.cpp peer needs llama-cpp-python: pip install llama-cpp-python") from exc
    return llama_cpp


# ----------------------------------------------------------------------------- writing


def check_supported(config) -> None:
    """Raise ValueError when llama.cpp's qwen3moe graph would compute something else."""
    problems = []
    if getattr(config, "model_type", None) != "qwen3_moe":
        problems.append(f"model_type is {getattr(config, 'model_type', None)!r}, not 'qwen3_moe'")
    if not getattr(config, "norm_topk_prob", False):
        problems.append("norm_topk_prob=False: llama.cpp's qwen3moe always renormalises the top-k "
                        "weights; build the model with norm_topk_prob=True")
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        problems.append("dense layers (mlp_only_layers / decoder_sparse_step != 1): llama.cpp's "
                        "qwen3moe expects an MoE block in every layer")
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias=True: qwen3moe in llama.cpp has no attention biases")
    if getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=True is not written to the GGUF")
    if getattr(config, "tie_word_embeddings", False):
        pass  # fine: llama.cpp reuses token_embd when output.weight is absent
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type {rope.get('rope_type')!r}: only plain RoPE is written")
    if problems:
        raise ValueError("cannot write this model as a llama.cpp qwen3moe GGUF:\n  - " + "\n  - ".join(problems))


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("config has no rope_theta (rope_parameters['rope_theta'])")
    return float(theta)


def _gguf_tensors(model, gguf) -> Iterator[tuple[str, Callable[[], torch.Tensor], bool]]:
    """(GGUF name, producer of the torch tensor in torch layout, keep in F32?) in file order.

    Producers run one at a time while the file is written, so at most one converted
    tensor is alive besides the model (an expert tensor of Qwen3-30B-A3B is 0.8 GB in F16).
    """
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    sd = model.state_dict()
    cfg = model.config

    def name(kind, bid=None) -> str:
        return (names[kind].format(bid=bid) if bid is not None else names[kind]) + ".weight"

    def take(key):
        return lambda: sd[key]

    yield name(T.TOKEN_EMBD), take("model.embed_tokens.weight"), False          # [V, K]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        n_ff = cfg.moe_intermediate_size
        yield name(T.ATTN_NORM, i), take(p + "input_layernorm.weight"), True      # [K]
        yield name(T.ATTN_Q, i), take(p + "self_attn.q_proj.weight"), False        # [H*Dh, K]
        yield name(T.ATTN_K, i), take(p + "self_attn.k_proj.weight"), False        # [Hkv*Dh, K]
        yield name(T.ATTN_V, i), take(p + "self_attn.v_proj.weight"), False        # [Hkv*Dh, K]
        yield name(T.ATTN_OUT, i), take(p + "self_attn.o_proj.weight"), False      # [K, H*Dh]
        yield name(T.ATTN_Q_NORM, i), take(p + "self_attn.q_norm.weight"), True    # [Dh]
        yield name(T.ATTN_K_NORM, i), take(p + "self_attn.k_norm.weight"), True    # [Dh]
        yield name(T.FFN_NORM, i), take(p + "post_attention_layernorm.weight"), True  # [K]
        # Router in F32 like llama.cpp's converter: top-k choices flip on small errors.
        yield name(T.FFN_GATE_INP, i), take(p + "mlp.gate.weight"), True            # [E, K]
        # transformers 5 stacks gate then up along dim 1: gate_up_proj [E, 2N, K].
        gate_up = p + "mlp.experts.gate_up_proj"
        yield name(T.FFN_GATE_EXP, i), lambda k=gate_up: sd[k][:, :n_ff, :], False  # [E, N, K]
        yield name(T.FFN_UP_EXP, i), lambda k=gate_up: sd[k][:, n_ff:, :], False    # [E, N, K]
        yield name(T.FFN_DOWN_EXP, i), take(p + "mlp.experts.down_proj"), False     # [E, K, N]
    yield name(T.OUTPUT_NORM), take("model.norm.weight"), True                     # [K]
    if not cfg.tie_word_embeddings:
        yield name(T.OUTPUT), take("lm_head.weight"), False                        # [V, K]


def _to_numpy(tensor: torch.Tensor, np_dtype, gguf_name: str) -> np.ndarray:
    """Contiguous numpy copy in np_dtype; non-finite values (NaN, or bf16 beyond the F16
    range) are an error, never written."""
    out = tensor.detach().to("cpu", torch.float32).to(
        torch.float16 if np_dtype == np.float16 else torch.float32).contiguous().numpy()
    if not np.isfinite(out).all():
        raise ValueError(f"{gguf_name}: non-finite values after conversion to {np.dtype(np_dtype).name} "
                         "(NaN in the model, or bf16 weights beyond the F16 range: use dtype='f32')")
    return out


def _add_metadata(writer, gguf, cfg, dtype: str) -> None:
    """The hyper-parameters llama.cpp reads for qwen3moe (llama_model_base::load_hparams and
    llama_model_qwen3moe::load_arch_hparams)."""
    writer.add_name("moecc qwen3moe peer")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    # Dense FFN width: unused by qwen3moe (every layer is MoE), written as the converter does.
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)  # llama.cpp asserts n_rot == head_dim for qwen3moe
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    # Not read by qwen3moe (renormalisation is hard-wired); written so the file says it.
    writer.add_expert_weights_norm(True)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # A vocabulary of V placeholder tokens: ids only, no text (see module docstring).
    writer.add_tokenizer_model("none")
    writer.add_vocab_size(cfg.vocab_size)


def write_gguf(model, path, *, dtype: str = "f16", progress: bool = True) -> Path:
    """Write a transformers Qwen3MoeForCausalLM as a llama.cpp `qwen3moe` GGUF file.

    dtype: "f16" (matrices in F16, norms and router in F32) or "f32" (all F32). The file is
    written under a temporary name and renamed at the end, so an interrupted write never
    leaves a file that looks complete. Returns the path.
    """
    gguf = _import_gguf()
    if dtype not in WRITE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(WRITE_DTYPES)}, got {dtype!r}")
    cfg = model.config
    check_supported(cfg)
    np_dtype = WRITE_DTYPES[dtype]
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")

    tensors = list(_gguf_tensors(model, gguf))
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3MOE])
    _add_metadata(writer, gguf, cfg, dtype)
    # Tensor infos first (shapes and types), then the data one tensor at a time.
    for gname, produce, keep_f32 in tensors:
        t = produce()
        out_dtype = np.dtype(np.float32 if keep_f32 else np_dtype)
        writer.add_tensor_info(gname, tuple(t.shape), out_dtype, t.numel() * out_dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"writing {path.name}", total=len(tensors))
        for gname, produce, keep_f32 in tensors:
            writer.write_tensor_data(_to_numpy(produce(), np.float32 if keep_f32 else np_dtype, gname))
            bar.advance(task)
    writer.close()
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------- quantising


def quantize_gguf(src, dst, qtype: str, *, threads: int = 0, progress: bool = True) -> Path:
    """Quantise a GGUF with llama.cpp's own `llama_model_quantize` (what `llama-quantize` runs).

    qtype: "Q8_0" or "Q4_K_M". llama.cpp decides per tensor (Q4_K_M keeps some tensors at
    Q6_K, 1-D tensors and the router stay F32; rows whose width is not a multiple of the
    block size fall back to another type). threads: 0 = all hardware threads. The call
    blocks for minutes on large files (Q4_K_M of the 4-layer Qwen3-30B-A3B-width model:
    ~10 min on 2 busy cores), so it runs in a thread while a progress line shows the bytes
    written so far.
    """
    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype must be one of {sorted(QUANT_TYPES)}, got {qtype!r}")
    llama_cpp = _import_llama_cpp()
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such GGUF (write it first with write_gguf)")
    tmp = dst.with_name(dst.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[qtype])
    params.nthread = threads
    rc = _run_with_file_progress(
        lambda: llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)),
        tmp, f"{qtype} <- {src.name}", progress)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) failed with code {rc}")
    os.replace(tmp, dst)
    return dst


def _run_with_file_progress(call: Callable[[], int], watched: Path, label: str, progress: bool) -> int:
    """Run a blocking C call (ctypes drops the GIL) in a thread; show `watched`'s size."""
    import threading

    from rich.progress import DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    result: list = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=None)
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
            bar.update(task, completed=watched.stat().st_size if watched.exists() else 0)
    if not result:
        raise RuntimeError(f"{label}: llama.cpp call raised (see the traceback above)")
    return result[0]


def gguf_tensor_bytes(path) -> int:
    """Bytes of all tensor data in a GGUF file (sum of each tensor's encoded size), the
    weight bytes a llama.cpp decode step would read if it touched every tensor."""
    gguf = _import_gguf()
    return int(sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors))


# --------------------------------------------------------------------------- decoding

# Weight types llama.cpp's CPU backend sends to its AMX kernels (ggml-cpu/amx/common.h).
_AMX_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")
_AMX_REBUILD = ("CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
                "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" "
                "pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python")


def amx_tensor_types(path) -> set[str]:
    """Names of the tensor types in a GGUF that llama.cpp would run on its AMX kernels."""
    gguf = _import_gguf()
    return {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors} & set(_AMX_TYPES)


def _check_amx(llama_cpp, path) -> None:
    """Refuse, with the fix, a file that would hit llama.cpp's crashing AMX kernels."""
    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        return
    types = amx_tensor_types(path)
    if types:
        raise LlamaCppUnavailable(
            f"{Path(path).name} has {', '.join(sorted(types))} tensors and this llama.cpp build uses "
            "AMX kernels for them, which crash the process with SIGILL (llama.cpp PR #26954). "
            f"Reinstall llama-cpp-python without AMX: {_AMX_REBUILD}; or pass allow_amx=True "
            "where the AMX kernels are known to work.")



def decode_ms_per_step(path, prompt_ids: Sequence[int], new_tokens: int, threads: int, *,
                       allow_amx: bool = False) -> dict:
    """Greedy decode in llama.cpp at batch 1; times every single-token step.

    The prompt is evaluated in one batch (its time is `prefill_ms`); then `new_tokens`
    steps each take the argmax of the last logits and evaluate that one token. A step's
    time covers the argmax and llama.cpp's decode call (perf_counter, milliseconds).

    Returns {"step_ms": [new_tokens floats], "tokens": [new_tokens ids] (the greedy
    continuation), "prompt_logits": float32 [V] logits at the prompt's last position,
    "prefill_ms": float, "threads": int}.

    allow_amx: run a quantised file even on a build with AMX kernels (see the module
    docstring: they crash this llama.cpp version on the machine it was tested on).
    """
    llama_cpp = _import_llama_cpp()
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("prompt_ids is empty: give at least one token id")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if not allow_amx:
        _check_amx(llama_cpp, path)
    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                          n_ctx=len(prompt) + new_tokens + 1, n_batch=max(len(prompt), 8),
                          logits_all=False, verbose=False)
    try:
        n_vocab = llm.n_vocab()
        bad = [t for t in prompt if not 0 <= t < n_vocab]
        if bad:
            raise ValueError(f"prompt ids {bad[:5]} outside the model's vocabulary [0, {n_vocab})")

        def last_logits() -> np.ndarray:  # [V], copied out of llama.cpp's buffer
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        logits = prompt_logits = last_logits()
        step_ms, tokens = [], []
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            tok = int(np.argmax(logits))
            llm.eval([tok])
            step_ms.append((time.perf_counter() - t0) * 1e3)
            tokens.append(tok)
            logits = last_logits()
    finally:
        llm.close()
    return {"step_ms": step_ms, "tokens": tokens, "prompt_logits": prompt_logits,
            "prefill_ms": prefill_ms, "threads": threads}


def decode_batch_ms_per_step(path, prompts: Sequence[Sequence[int]], new_tokens: int, threads: int, *,
                             allow_amx: bool = False) -> dict:
    """Greedy decode of B sequences at once in llama.cpp; times every step of B tokens.

    One context holds B sequences (`n_seq_max` = B, each with its own KV cells: no unified
    cache, so a sequence's attention reads only its own tokens, like a [B, H, L, D] static
    cache). The B prompts (equal lengths not required) go in as one batch (its time is
    `prefill_ms`); then every step takes each sequence's argmax and evaluates those B
    tokens as one `llama_decode` call (seq_id b, position len(prompt_b) + step). A step's
    time covers the B argmaxes, filling the batch and the decode call. The context's
    settings otherwise match `decode_ms_per_step` (flash attention off, F16 KV cache).

    Returns {"step_ms": [new_tokens floats], "tokens": [B lists of new_tokens ids],
    "prompt_logits": float32 [B, V] logits at each prompt's last position,
    "prefill_ms": float, "threads": int, "batch": B}.
    """
    llama_cpp = _import_llama_cpp()
    seqs = [[int(t) for t in p] for p in prompts]
    if not seqs or any(not p for p in seqs):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if not allow_amx:
        _check_amx(llama_cpp, path)
    n_seq, n_prompt = len(seqs), sum(len(p) for p in seqs)
    per_seq = max(len(p) for p in seqs) + new_tokens + 1
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_seq * per_seq        # split evenly over the sequences (kv_unified off)
    cparams.n_batch = cparams.n_ubatch = max(n_prompt, n_seq)
    cparams.n_seq_max = n_seq
    cparams.kv_unified = False
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cparams.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    batch = llama_cpp.llama_batch_init(max(n_prompt, n_seq), 0, 1)
    try:
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {n_seq} sequences")
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        bad = [t for p in seqs for t in p if not 0 <= t < n_vocab]
        if bad:
            raise ValueError(f"prompt ids {bad[:5]} outside the model's vocabulary [0, {n_vocab})")

        def fill(entries) -> list[int]:
            """entries: (token, position, seq_id, wants_logits); returns the batch indices with logits."""
            out = []
            for i, (tok, pos, seq, want) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = want
                if want:
                    out.append(i)
            batch.n_tokens = len(entries)
            return out

        def decode() -> None:
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} (1: no KV slot for the batch; <0: error)")

        def logits_at(rows: list[int]) -> np.ndarray:  # [B, V], copied out of llama.cpp's buffer
            return np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
                             for i in rows])

        rows = fill([(tok, pos, b, pos == len(p) - 1) for b, p in enumerate(seqs) for pos, tok in enumerate(p)])
        t0 = time.perf_counter()
        decode()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        logits = prompt_logits = logits_at(rows)
        step_ms, tokens = [], [[] for _ in seqs]
        for step in range(new_tokens):
            t0 = time.perf_counter()
            toks = [int(t) for t in np.argmax(logits, axis=1)]
            rows = fill([(tok, len(p) + step, b, True) for b, (tok, p) in enumerate(zip(toks, seqs))])
            decode()
            step_ms.append((time.perf_counter() - t0) * 1e3)
            for b, tok in enumerate(toks):
                tokens[b].append(tok)
            logits = logits_at(rows)
    finally:
        llama_cpp.llama_batch_free(batch)
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return {"step_ms": step_ms, "tokens": tokens, "prompt_logits": prompt_logits,
            "prefill_ms": prefill_ms, "threads": threads, "batch": n_seq}
