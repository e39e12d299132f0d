"""Capture coverage of transformers' MoE architectures: one tiny model each, compiled.

    results = sweep(moe_architectures(), budget_s=1800)
    write_reports(results, "docs/coverage.md", "docs/coverage.json")

For each architecture (moecc.architectures): is it buildable by eager transformers from
its default config; build the tiny model (fp32, random weights, `grouped_mm` experts);
run eager; compile with backend="moecc" (capture verification on, the reference op,
the rest of the graph eager: tracing, not kernel compilation, is what is being tested);
compare logits (or the last hidden state for decoders without an LM head); count MoE
layers present (modules owning an `experts` child) and captured; record the router /
activation variants, which kernel backends can run them, Dynamo graph breaks, and the
reason for every layer left alone.

Status of an architecture:
    captured        every MoE layer captured, output within tolerance
    partial         some layers captured, others declined with a reason
    declined        no layer captured; the reasons say why
    WRONG           compiled output differs from eager: a bug, never acceptable
    error           compilation raised (the message is recorded)
    not-built       the tiny model could not be built or run in eager (shrinking)
    no-default      eager transformers cannot build it from its default config (not counted)
    not-run         the time budget ran out before it
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

# Relative logit error (max |compiled - eager| / max |eager|) allowed in fp32: the op sums
# experts in another order than transformers (rounding level, ~1e-7 measured).
FP32_OUTPUT_RTOL = 1e-5
COUNTED = ("captured", "partial", "declined", "WRONG", "error", "not-built")


@dataclass
class CoverageResult:
    architecture: str
    status: str
    model_class: str = ""
    moe_present: int = 0
    moe_captured: int = 0
    variants: list[str] = field(default_factory=list)  # distinct spec descriptions
    kernels: str = ""  # which kernel backends can run every captured layer
    graph_breaks: int = 0
    max_rel_error: Optional[float] = None
    reasons: list[str] = field(default_factory=list)  # declines, errors, notes
    seconds: float = 0.0
    default_config_builds: bool = True


def check_architecture(architecture: str, *, tokens: tuple[int, int] = (2, 7)) -> CoverageResult:
    """Build, run, compile and compare one architecture's tiny model."""
    import torch

    import moecc
    from moecc.architectures import CannotBuild, build_tiny_model, default_build_error

    start = time.perf_counter()
    result = CoverageResult(architecture, "not-built")
    default_error = default_build_error(architecture)
    if default_error is not None:
        result.default_config_builds = False
        result.reasons.append(f"eager transformers cannot build the default config: {default_error}")
    try:
        model, info = build_tiny_model(architecture)
        result.model_class = info.model_class
        model.set_experts_implementation("grouped_mm")
        result.moe_present = sum(1 for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module))
        ids = torch.randint(0, 256, tokens, generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = _main_output(model(input_ids=ids, use_cache=False))
    except CannotBuild as exc:
        result.reasons.append(f"tiny model not built: {exc}")
        return _finish(result, start)
    except Exception as exc:  # noqa: BLE001 - eager transformers failing on the tiny model is the finding
        result.reasons.append(f"eager forward of the tiny model fails: {_one_line(exc)}")
        return _finish(result, start)
    if result.moe_present == 0:
        result.reasons.append("the tiny model has no MoE layer (the shrunk config made every layer dense)")
        return _finish(result, start)

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    report = moecc.CompileReport()
    options = {"report": report, "kernel_backend": "reference", "rest_of_graph": "eager"}
    try:
        compiled = torch.compile(model, backend="moecc", options=options)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _main_output(compiled(input_ids=ids, use_cache=False))
    except Exception as exc:  # noqa: BLE001 - recorded as the architecture's error
        result.status = "error"
        result.reasons.append(f"compilation fails: {_one_line(exc)}")
        return _finish(result, start)
    finally:
        result.graph_breaks = sum(counters["graph_break"].values())
        torch._dynamo.reset()

    result.moe_captured = len({c.module_path for c in report.captured})
    result.variants = sorted({c.spec.describe() for c in report.captured})
    result.kernels = _kernels([c.spec for c in report.captured])
    result.reasons.extend(sorted({f"{_generic_path(s.module_path)} ({s.module_class}): {s.reason}"
                                  for s in report.skipped}))
    if result.graph_breaks:
        result.reasons.append(f"{result.graph_breaks} graph break(s): "
                              + "; ".join(sorted(counters["graph_break"])[:2]))
    err = _relative_error(got, expected)
    result.max_rel_error = err
    if err is None or err > FP32_OUTPUT_RTOL:
        result.status = "WRONG"
        result.reasons.insert(0, f"compiled output differs from eager (relative error {err})")
    elif result.moe_captured >= result.moe_present:
        result.status = "captured"
    else:
        result.status = "partial" if result.moe_captured else "declined"
    return _finish(result, start)


def sweep(architectures: Iterable[str], *, budget_s: float = 3600.0,
          on_result: Optional[Callable[[CoverageResult], None]] = None) -> list[CoverageResult]:
    """check_architecture for each, in order, until the time budget is spent."""
    deadline = time.perf_counter() + budget_s
    results = []
    for name in architectures:
        if time.perf_counter() > deadline:
            r = CoverageResult(name, "not-run", reasons=[f"time budget of {budget_s:.0f} s spent"])
        else:
            r = check_architecture(name)
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results


def summary(results: list[CoverageResult]) -> dict[str, int]:
    counted = [r for r in results if r.default_config_builds and r.status in COUNTED]
    return {
        "architectures": len(results),
        "counted": len(counted),
        "captured_fully": sum(r.status == "captured" for r in counted),
        "wrong": sum(r.status == "WRONG" for r in results),
        "no_default_config": sum(not r.default_config_builds for r in results),
        "not_run": sum(r.status == "not-run" for r in results),
    }


def to_json(results: list[CoverageResult], meta: dict) -> str:
    return json.dumps({"meta": meta, "summary": summary(results),
                       "results": [dataclasses.asdict(r) for r in results]}, indent=1)


def to_markdown(results: list[CoverageResult], meta: dict) -> str:
    s = summary(results)
    pct = 100.0 * s["captured_fully"] / s["counted"] if s["counted"] else 0.0
    lines = [
        "| architecture | status | MoE layers captured / present | router and activation | kernels | "
        "graph breaks | reason / note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        variants = "<br>".join(v.replace("|", "/") for v in r.variants) or "-"
        reasons = "<br>".join(x.replace("|", "/").replace("\n", " ")[:400] for x in r.reasons) or ""
        lines.append(f"| {r.architecture} | {r.status} | {r.moe_captured} / {r.moe_present} | {variants} | "
                     f"{r.kernels or '-'} | {r.graph_breaks} | {reasons} |")
    head = [
        f"Measured {meta.get('date', '')} on {meta.get('device', '')} with `{meta.get('command', '')}` "
        f"(transformers {meta.get('transformers', '')}, torch {meta.get('torch', '')}, "
        f"{meta.get('seconds', 0):.0f} s).",
        "",
        f"**{s['captured_fully']} of {s['counted']} counted architectures captured fully ({pct:.0f}%), "
        f"{s['wrong']} wrong.** {s['no_default_config']} architecture(s) that eager transformers cannot "
        f"build from their default config are listed but not counted; {s['not_run']} not run (time budget).",
        "",
    ]
    return "\n".join(head + lines) + "\n"


def _kernels(specs) -> str:
    if not specs:
        return ""
    from moecc.spec import kernel_unsupported

    missing = sorted({m for spec in specs for m in kernel_unsupported(spec)})
    if not missing:
        return "reference, triton, tvm"
    return "reference only (kernels lack: " + ", ".join(missing) + ")"


def _main_output(out):
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _relative_error(got, expected) -> Optional[float]:
    import torch

    if got.shape != expected.shape or not torch.isfinite(got).all():
        return None
    scale = expected.float().abs().max().clamp_min(1e-12)
    return float((got.float() - expected.float()).abs().max() / scale)


def _generic_path(path: str) -> str:
    """model.layers.3.mlp -> model.layers.*.mlp: one reason line per kind of layer."""
    return ".".join("*" if p.isdigit() else p for p in path.split("."))


def _finish(result: CoverageResult, start: float) -> CoverageResult:
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:400]
