"""The training script keeps working (a few steps, both architectures) and the data split holds:
nothing held out is trained on, and the shipped held-out sample really is held out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest
import torch

from moecc.models import HELDOUT_DIR
from moecc.training.corpus import HELDOUT_MODULUS, is_heldout, stdlib_documents, training_streams
from moecc.training.recipes import RECIPES, get_recipe
from moecc.training.train import build_untrained, train


@pytest.fixture(scope="module")
def documents():
    return stdlib_documents()


def test_heldout_split_is_a_stable_hash_of_the_path():
    for rel in ("json/decoder.py", "runpy.py", "pydoc_data/topics/if"):
        digest = hashlib.sha256(rel.encode()).digest()
        assert is_heldout(rel) == (int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0)
    assert is_heldout("runpy.py")  # a shipped held-out file


def test_heldout_text_is_not_in_the_training_streams(documents):
    streams = training_streams(documents)
    held = [d for d in documents if d.heldout and d.domain == "code" and len(d.text) > 2000]
    assert held and all(not d.heldout for d in documents if d.name == "os.py")
    code = streams["code"].tobytes()
    for d in held[:5]:
        # A 400-byte slice from the middle of each held-out file (file headers can repeat).
        mid = len(d.text) // 2
        assert d.text[mid: mid + 400].encode() not in code, d.name


def test_shipped_heldout_sample_is_held_out():
    names = os.listdir(os.path.join(HELDOUT_DIR, "code"))
    assert len(names) >= 5
    for name in names:
        assert is_heldout(name.replace("__", "/")), name


@pytest.mark.parametrize("name", ["qwen3-moe-stdlib", "deepseek-v3-stdlib"])
def test_training_runs_a_few_steps_and_saves_a_loadable_model(tmp_path, name, quiet):
    from transformers import AutoModelForCausalLM

    # The recipe's model and loss at a smaller batch: the same code path, seconds not minutes.
    recipe = dataclasses.replace(get_recipe(name), batch=4, seq_len=64)
    initial = build_untrained(recipe).state_dict()
    log = train(recipe, str(tmp_path), steps=3, log_every=1, progress=False)
    assert log["steps"] == 3 and len(log["loss_every_step_nats"]) == 3
    assert all(0 < x < 10 for x in log["loss_every_step_nats"])
    assert json.load(open(tmp_path / "train_log.json"))["model"] == name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    state = loaded.state_dict()
    changed = [k for k in initial if k in state and not torch.equal(initial[k], state[k])]
    assert any("experts" in k for k in changed) and any("gate" in k for k in changed)
    if recipe.bias_update_speed:
        biases = [v for k, v in state.items() if k.endswith("e_score_correction_bias")]
        assert biases and all(b.abs().max() > 0 for b in biases)  # the balancer moved them


def test_unknown_recipe_says_which_exist():
    with pytest.raises(KeyError, match="qwen3-moe-stdlib"):
        get_recipe("nope")
    assert set(RECIPES) == {"qwen3-moe-stdlib", "qwen3-moe-stdlib-noaux", "deepseek-v3-stdlib"}
