"""A run does not depend on what was cached or run before it.

The bug: training seeded the global RNG before loading the model; a first load of smollm2-135m converts the GGUF
through `AutoModelForCausalLM.from_config`, whose random initialisation consumed that RNG, so a cold cache changed
the LoRA initialisation and every sample. Here tiny-random gets the same kind of conversion path (a test double,
installed for these tests only): built from its config on a cold cache, saved, then loaded from the cache.
"""

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

import tokeneff.models as models
from tokeneff import make_config, train
from tokeneff.analysis.grid import _train_one
from tokeneff.loop import TIMING_KEYS

_real_tiny_random = models.tiny_random


def _tiny_through_a_cache(vocab_size=None, **kw):
    """tiny-random as smollm2-135m is loaded: converted into the cache on first use (a random init from the config
    that consumes the global RNG, then the weights copied in), read back from the cache afterwards."""
    from transformers import AutoModelForCausalLM

    target = models.cache_dir() / "tiny-converted"
    if not (target / "model.safetensors").is_file():
        ref, _ = _real_tiny_random(vocab_size=vocab_size, **kw)
        model = AutoModelForCausalLM.from_config(ref.config, dtype=torch.float32)
        model.load_state_dict(ref.state_dict())
        model.save_pretrained(target)
    return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32), models.char_tokenizer()


def _cfg(out, **over):
    base = dict(model="tiny-random", task="multiplication", digits_a=1, digits_b=1, steps=2, group_size=4,
                prompts_per_step=2, max_new_tokens=8, eval_limit=4, eval_batch_size=4, eval_every=2,
                eval_at_start=False, lr=1e-2, out=str(out))
    return make_config("embedded", overrides=dict(base, **over))


def _result(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
    return rows, load_file(run / "adapter" / "adapter_model.safetensors")


def _assert_same(a, b):
    (ma, wa), (mb, wb) = a, b
    assert ma == mb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_cold_cache_gives_the_same_run_as_a_warm_one(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "tiny_random", _tiny_through_a_cache)
    monkeypatch.setenv("TOKENEFF_CACHE", str(tmp_path / "cache"))
    # the double's cold path does consume the global RNG, as the GGUF conversion does: without seeding after the
    # load, the two runs below would differ
    torch.manual_seed(0)
    models.load_model("tiny-random")
    after_cold = torch.rand(4)
    torch.manual_seed(0)
    models.load_model("tiny-random")  # now warm
    assert not torch.equal(after_cold, torch.rand(4))

    monkeypatch.setenv("TOKENEFF_CACHE", str(tmp_path / "cold"))
    train(_cfg(tmp_path / "a"), progress=False)  # converts into the empty cache first
    assert (tmp_path / "cold" / "tiny-converted" / "model.safetensors").is_file()
    train(_cfg(tmp_path / "b"), progress=False)  # the cache is warm now
    _assert_same(_result(tmp_path / "a"), _result(tmp_path / "b"))


@pytest.mark.parametrize("first", [dict(algo="tspmo", replay="on", seed=1), dict(algo="sgrpo", seed=3)])
def test_a_run_after_another_in_the_same_process_equals_a_fresh_one(tmp_path, first):
    # as a grid worker runs its jobs one after another: another job first, then the job under test
    train(_cfg(tmp_path / "other", **first), progress=False)
    train(_cfg(tmp_path / "after"), progress=False)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:  # a process that ran nothing before
        pool.submit(_train_one, _cfg(tmp_path / "fresh")).result()  # the grid's worker entry point
    _assert_same(_result(tmp_path / "after"), _result(tmp_path / "fresh"))
