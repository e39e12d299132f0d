"""Expert pruning end to end (moecc/pruning.py, options["prune_experts"]): option
validation and bad statistics, the plan (criteria, super experts, top-k floor), and on the
trained models: the compiled pruned model equals the eager model with the same experts
masked, and pruning nothing is bit-identical to not pruning."""

from __future__ import annotations

import json
import math

import pytest
import torch

import moecc
from moecc.options import CompileOptions, OptionsError
from moecc.pruning import (PruningError, mask_experts, parse_prune_config, plan_for_model, plan_pruning,
                           super_experts)
from moecc.routing_stats import LayerStats, ModelFingerprint, RoutingStats
from routing_fixtures import trained_model, trained_stats


def _stats(counts, reap=None, max_activation=None, top_k=2, name="model.layers.0.mlp"):
    e = len(counts)
    tokens, rest = divmod(sum(counts), top_k)
    assert not rest
    layer = LayerStats(name, 0, e, top_k, tokens, list(counts), None, reap or [1.0] * e,
                       max_activation or [1.0] * e, None)
    return RoutingStats(ModelFingerprint("test", 1, [name], [e], [top_k]), [layer])


@pytest.mark.parametrize("value,message", [
    ({"keep": 0.5}, "'stats' is required"),
    ({"stats": "S", "keep": 0}, "'keep' is the fraction of experts kept per layer, in (0, 1]; got 0"),
    ({"stats": "S", "keep": 1.5}, "in (0, 1]; got 1.5"),
    ({"stats": "S", "keep": -0.25}, "in (0, 1]; got -0.25"),
    ({"stats": "S", "keep": float("nan")}, "in (0, 1]; got nan"),
    ({"stats": "S", "keep": "half"}, "in (0, 1]; got 'half'"),
    ({"stats": "S", "criterion": "l2"}, "'criterion' must be one of 'reap', 'reap_sum', 'frequency', 'random'"),
    ({"stats": "S", "keeps": 0.5}, "unknown key(s) ['keeps']; valid keys: stats, keep"),
    ({"stats": 3}, "'stats' must be a path or a moecc.RoutingStats"),
    (0.75, "expected a dict"),
    ({"certified": "yes"}, "'certified' must be True or False, got 'yes'"),
    ({"certified": True, "keep": 0.5}, "'stats' is required"),
])
def test_bad_options_name_the_problem(value, message):
    if isinstance(value, dict) and value.get("stats") == "S":
        value = dict(value, stats=_stats([3, 1, 2, 2]))
    with pytest.raises(OptionsError, match=r"moecc option 'prune_experts': .*" + _escape(message)):
        CompileOptions(prune_experts=value)


def test_certified_alone_needs_no_statistics():
    config = CompileOptions(prune_experts={"certified": True}).prune_experts
    assert config.certified and config.stats is None and config.keep == 1.0


def _escape(text):
    import re

    return re.escape(text)


def test_truncated_corrupted_and_missing_statistics_files(tmp_path):
    good = tmp_path / "good.json"
    _stats([3, 1, 2, 2]).save(str(good))
    assert CompileOptions(prune_experts={"stats": str(good), "keep": 0.5}).prune_experts.keep == 0.5
    text = good.read_text()
    cases = {"truncated.json": (text[: len(text) // 2], "truncated or not JSON"),
             "corrupted.json": (text.replace('"counts": [3, 1, 2, 2]', '"counts": [3, 1, 2]'),
                                "3 counts for 4 experts; the file is corrupted"),
             "other.json": (json.dumps({"format": "something"}), "not a moecc routing-statistics file")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(OptionsError, match=_escape(message)):
            CompileOptions(prune_experts={"stats": str(tmp_path / name), "keep": 0.5})
    with pytest.raises(OptionsError, match="no such statistics file"):
        CompileOptions(prune_experts={"stats": str(tmp_path / "absent.json")})


def test_counts_only_statistics_refuse_reap_but_allow_frequency():
    stats = _stats([3, 1, 2, 2])
    stats.layers[0].reap = None
    with pytest.raises(PruningError, match="no REAP scores"):
        parse_prune_config({"stats": stats, "criterion": "reap"})
    with pytest.raises(PruningError, match="no REAP scores"):
        parse_prune_config({"stats": stats, "criterion": "reap_sum"})
    assert parse_prune_config({"stats": stats, "criterion": "frequency"}).criterion == "frequency"


def test_plan_removes_the_lowest_scores_and_respects_floors():
    counts = [40, 2, 30, 6, 10, 4, 6, 2]  # sums to 100 = 50 tokens x top-2
    reap = [1.0, 9.0, 2.0, 0.5, 3.0, 8.0, 0.1, 7.0]
    stats = _stats(counts, reap)
    freq = plan_pruning(stats, parse_prune_config({"stats": stats, "keep": 0.75, "criterion": "frequency"}))
    assert freq.layers[0].removed == (1, 7)  # fewest tokens; the tie 1/7 broken by id
    by_reap = plan_pruning(stats, parse_prune_config({"stats": stats, "keep": 0.5, "criterion": "reap"}))
    assert by_reap.layers[0].removed == (0, 2, 3, 6)
    assert by_reap.layers[0].kept == (1, 4, 5, 7)
    # reap_sum = reap x counts = [40, 18, 60, 3, 30, 32, 0.6, 14]: the busy expert 0 stays
    by_sum = plan_pruning(stats, parse_prune_config({"stats": stats, "keep": 0.5, "criterion": "reap_sum"}))
    assert by_sum.layers[0].removed == (1, 3, 6, 7)
    floor = plan_pruning(stats, parse_prune_config({"stats": stats, "keep": 0.01, "criterion": "reap"}))
    assert len(floor.layers[0].kept) == 2 and "top_k=2 must stay" in floor.layers[0].note
    r1, r2, r3 = (plan_pruning(stats, parse_prune_config({"stats": stats, "keep": 0.5, "criterion": "random",
                                                           "seed": s})) for s in (0, 0, 1))
    assert r1 == r2 and len(r1.layers[0].removed) == 4
    assert r1 != r3 or r1.layers[0].removed != plan_pruning(stats, parse_prune_config(
        {"stats": stats, "keep": 0.5, "criterion": "random", "seed": 2})).layers[0].removed


def test_super_experts_are_protected_unless_asked_not_to():
    counts = [40, 2, 30, 6, 10, 4, 6, 2]
    act = [1.0, 1.2, 0.9, 1.1, 1.0, 1.0, 1.0, 50.0]  # expert 7: 50x the median
    stats = _stats(counts, max_activation=act)
    assert super_experts(stats.layers[0]) == [7]
    protected = plan_pruning(stats, parse_prune_config({"stats": stats, "keep": 0.75, "criterion": "frequency"}))
    assert 7 not in protected.layers[0].removed and protected.layers[0].protected == (7,)
    assert protected.layers[0].removed == (1, 5)
    bare = plan_pruning(stats, parse_prune_config({"stats": stats, "keep": 0.75, "criterion": "frequency",
                                                   "protect_super_experts": False}))
    assert bare.layers[0].removed == (1, 7)


# --- trained models ---------------------------------------------------------------------

def _ids():
    from moecc.eval_data import domain_windows, load_texts
    from moecc.models import HELDOUT_DIR

    return domain_windows(load_texts(HELDOUT_DIR), 128, 1024)["english"][:2]  # [2, 128]


@pytest.mark.parametrize("name,how", [("qwen3-moe-stdlib", "rows_deleted"), ("deepseek-v3-stdlib", "masked")])
def test_compiled_pruned_model_equals_eager_masked_model(name, how):
    model, stats = trained_model(name), trained_stats(name)
    option = {"stats": stats, "keep": 0.75, "criterion": "reap"}
    report = moecc.CompileReport()
    compiled = torch.compile(model, backend="moecc", options={
        "prune_experts": option, "report": report, "kernel_backend": "reference", "rest_of_graph": "eager"})
    ids = _ids()
    plan = plan_for_model(model, parse_prune_config(option))
    with torch.no_grad():
        got = compiled(input_ids=ids).logits
        with mask_experts(model, plan):
            want = model(input_ids=ids).logits
        unpruned = model(input_ids=ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - unpruned).abs().max() > 0.1  # the plan changed the model
    moe_layers = len(stats.layers)
    assert report.pass_counter("prune_experts", how) == moe_layers
    assert report.pass_counter("prune_experts", "experts_removed") == plan.removed_experts == 4 * moe_layers
    text = report.format()
    assert "removed 4/16 experts" in text and "KiB of expert weights saved" in text


@pytest.mark.slow  # two compiles; the default run covers it at the pass level (keep=1 leaves the graph untouched)
def test_pruning_nothing_is_bit_identical_to_not_pruning():
    model, stats = trained_model("qwen3-moe-stdlib"), trained_stats("qwen3-moe-stdlib")
    ids = _ids()
    base = {"kernel_backend": "reference", "rest_of_graph": "eager"}
    with torch.no_grad():
        plain = torch.compile(model, backend="moecc", options=base)(input_ids=ids).logits
        torch._dynamo.reset()
        kept = torch.compile(model, backend="moecc", options={**base, "prune_experts": {
            "stats": stats, "keep": 1.0}})(input_ids=ids).logits
    torch._dynamo.reset()
    assert torch.isfinite(plain).all() and torch.equal(plain, kept)


def test_statistics_of_another_model_are_an_error():
    qwen_stats, deepseek = trained_stats("qwen3-moe-stdlib"), trained_model("deepseek-v3-stdlib")
    config = parse_prune_config({"stats": qwen_stats, "keep": 0.75})
    with pytest.raises(PruningError, match="statistics recorded on another model: model_type is 'qwen3_moe'"):
        plan_for_model(deepseek, config)
    compiled = torch.compile(deepseek, backend="moecc", options={
        "prune_experts": {"stats": qwen_stats, "keep": 0.75}, "kernel_backend": "reference",
        "rest_of_graph": "eager"})
    with pytest.raises(Exception, match=r"recorded on another model: model_type is 'qwen3_moe' in the statistics, "
                                        r"\['deepseek_v3'\] in the compiled graph"):
        with torch.no_grad():
            compiled(input_ids=_ids())
    torch._dynamo.reset()


def test_mask_experts_restores_the_model():
    model, stats = trained_model("deepseek-v3-stdlib"), trained_stats("deepseek-v3-stdlib")
    plan = plan_for_model(model, parse_prune_config({"stats": stats, "keep": 0.5}))
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    before = bias.clone()
    with mask_experts(model, plan):
        assert math.isinf(float(bias[plan.layers[0].removed[0]]))
    assert torch.equal(bias, before)


def test_keep_for_max_loss_stops_before_the_bound():
    from moecc.pruning import keep_for_max_loss

    model, stats = trained_model("qwen3-moe-stdlib-noaux"), trained_stats("qwen3-moe-stdlib-noaux")
    batches = [_ids()]
    assert keep_for_max_loss(model, stats, batches, max_loss=-1.0) == 1.0  # nothing can meet it
    assert keep_for_max_loss(model, stats, batches, max_loss=100.0, candidates=(0.75, 0.5)) == 0.5
    tight = keep_for_max_loss(model, stats, batches, max_loss=0.01, criterion="frequency")
    assert tight in (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
    # The chosen keep meets the bound; the next candidate (if any) misses it.
    config = parse_prune_config({"stats": stats, "keep": tight, "criterion": "frequency"})

    def loss():
        with torch.no_grad():
            logits = model(input_ids=batches[0]).logits[:, :-1].double()
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batches[0][:, 1:].reshape(-1)))

    base = loss()
    with mask_experts(model, plan_for_model(model, config)):
        assert loss() - base <= 0.01


def test_max_loss_in_the_pass_chooses_the_eager_keep():
    """The pass measures the loss on the captured graph with candidate plans masked and
    picks what moecc.pruning.keep_for_max_loss picks eagerly on the same windows."""
    from moecc.eval_data import domain_windows, load_texts
    from moecc.models import HELDOUT_DIR
    from moecc.pruning import keep_for_max_loss

    model, stats = trained_model("qwen3-moe-stdlib-noaux"), trained_stats("qwen3-moe-stdlib-noaux")
    data = domain_windows(load_texts(HELDOUT_DIR), 128, 8192)["code"][-4:]  # [4, 128], not calibrated on
    want = keep_for_max_loss(model, stats, [data[:2], data[2:]], max_loss=0.02, criterion="frequency")
    assert want < 1.0  # the bound lets something go, so a pass that prunes nothing fails
    option = {"stats": stats, "max_loss": 0.02, "criterion": "frequency", "data": data}
    report = moecc.CompileReport()
    compiled = torch.compile(model, backend="moecc", options={
        "prune_experts": option, "report": report, "kernel_backend": "reference", "rest_of_graph": "eager"})
    with torch.no_grad():
        got = compiled(input_ids=data[:2]).logits
        with mask_experts(model, plan_for_model(model, parse_prune_config(
                {"stats": stats, "keep": want, "criterion": "frequency"}))):
            masked = model(input_ids=data[:2]).logits
    torch._dynamo.reset()
    text = report.format()
    assert f"keep {want:g} chosen on 4 windows of 128 tokens" in text, text
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value,message", [
    ({"stats": "S", "max_loss": 0.01, "keep": 0.5}, "give 'keep' or 'max_loss', not both"),
    ({"stats": "S", "max_loss": 0}, "'max_loss' is the allowed rise"),
    ({"stats": "S", "max_loss": float("nan")}, "'max_loss' is the allowed rise"),
    ({"stats": "S", "max_loss": 0.1, "data": 3}, "'data' (for max_loss) must be a text file or folder"),
])
def test_bad_max_loss_options(value, message):
    stats = _stats([3, 1, 2, 2])
    with pytest.raises(PruningError, match=_escape(message)):
        parse_prune_config({**value, "stats": stats})


def test_max_loss_without_data_names_the_problem():
    model, stats = trained_model("qwen3-moe-stdlib-noaux"), trained_stats("qwen3-moe-stdlib-noaux")
    compiled = torch.compile(model, backend="moecc", options={
        "prune_experts": {"stats": stats, "max_loss": 0.01}, "kernel_backend": "reference", "rest_of_graph": "eager"})
    with pytest.raises(Exception, match="max_loss: the statistics name no data path that exists here"):
        with torch.no_grad():
            compiled(input_ids=_ids())
    torch._dynamo.reset()


def test_explain_prune_shows_removed_experts_and_bytes(tmp_path, capsys):
    from moecc.cli import main

    path = tmp_path / "stats.json"
    trained_stats("qwen3-moe-stdlib").save(str(path))
    assert main(["explain", "qwen3-moe-stdlib", "--prune", str(path), "--keep", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.count("removed 8/16 experts") == 3 and "768 KiB of expert weights saved" in out
    assert main(["explain", "qwen3-moe-stdlib", "--prune", str(path), "--keep", "0"]) == 2
    assert "--prune: 'keep' is the fraction of experts kept per layer" in capsys.readouterr().out
    torch._dynamo.reset()


@pytest.mark.slow  # up to 7 graph runs over 32 windows; the default run covers max_loss with given token ids
def test_max_loss_reads_the_text_the_statistics_name_held_out():
    import copy

    from moecc.models import HELDOUT_DIR

    model = trained_model("qwen3-moe-stdlib-noaux")
    stats = copy.copy(trained_stats("qwen3-moe-stdlib-noaux"))
    stats.data, stats.extra = f"{HELDOUT_DIR} (code 4096 bytes, english 4096 bytes)", {"max_bytes": 4096}
    report = moecc.CompileReport()
    compiled = torch.compile(model, backend="moecc", options={
        "prune_experts": {"stats": stats, "max_loss": 0.05}, "report": report, "kernel_backend": "reference",
        "rest_of_graph": "eager"})
    with torch.no_grad():
        out = compiled(input_ids=_ids()[:, :64]).logits
    torch._dynamo.reset()
    text = report.format()
    assert torch.isfinite(out).all()
    assert f"windows of 64 tokens ({HELDOUT_DIR}, held out: after the calibrated bytes)" in text, text
