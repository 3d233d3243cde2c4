import dataclasses
import re
from collections import Counter

import pytest
import torch
from helpers import policy_with_a_live_adapter

from tokeneff import make_config
from tokeneff.errors import ConfigError, TokeneffError
from tokeneff.models import tiny_random
from tokeneff.rollout import pick_next, sample

CONTEXTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # ragged: two of the three are left-padded


def _model_with_early_eos():
    """The tiny model, with EOS set to a token that greedy decoding emits early in one context but not in the
    others, so that rows finish at different steps."""
    model, tok = tiny_random(seed=1)
    model.eval()
    free = sample(model, tok, CONTEXTS, 1, 10, greedy=True, backend="hf").completions
    counts = Counter(t for row in free for t in set(row[1:6]))
    eos = next(t for t, n in counts.most_common() if n == 1)
    model.generation_config.eos_token_id = eos
    tok.eos_token_id = eos
    return model, tok


@pytest.mark.parametrize("backend", ["hf", "hf-static"])
def test_decode_loop_matches_generate_greedy(backend):
    model, tok = _model_with_early_eos()
    ours = sample(model, tok, CONTEXTS, 3, 10, greedy=True)
    ref = sample(model, tok, CONTEXTS, 3, 10, greedy=True, backend=backend)
    assert ours.completions == ref.completions
    assert ours.truncated == ref.truncated
    assert 0 < sum(ours.truncated) < len(ours.truncated), "some rows should stop at EOS, some at the cap"
    assert torch.equal(ours.completion_ids, ref.completion_ids) and torch.equal(ours.completion_mask,
                                                                                ref.completion_mask)


def test_finished_rows_leave_the_batch():
    model, tok = _model_with_early_eos()
    sizes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    roll = sample(model, tok, CONTEXTS, 2, 10, greedy=True)
    hook.remove()
    lens = [len(c) for c in roll.completions]
    # one prefill of the 3 contexts (not 6 rows), then decode step t runs the rows that have not stopped yet
    expected = [len(CONTEXTS)] + [sum(n > t for n in lens) for t in range(1, max(lens))]
    assert sizes == expected
    assert expected[-1] < 2 * len(CONTEXTS)


@pytest.mark.parametrize("backend", ["tokeneff", "hf"])
def test_rollout_with_activation_checkpointing_in_train_mode_keeps_its_cache(backend):
    """Checkpointing in train mode makes transformers drop the KV cache; `sample` must not let that happen."""
    model, tok = tiny_random(seed=1)
    model.eval()
    want = sample(model, tok, CONTEXTS, 2, 8, greedy=True, backend=backend).completions
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert sample(model, tok, CONTEXTS, 2, 8, greedy=True, backend=backend).completions == want
    assert model.training


@pytest.mark.parametrize("draw", ["multinomial", "inverse-cdf"])
def test_pick_next_draws_from_tempered_softmax_and_nucleus(draw):
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[None].expand(20000, 4)
    for temperature in (1.0, 0.5):
        freq = torch.bincount(pick_next(logits, temperature, draw=draw), minlength=4).float() / len(logits)
        assert torch.allclose(freq, torch.softmax(logits[0] / temperature, -1), atol=0.015)
    # top-p 0.7: the nucleus is {0.5, 0.3}, renormalised to 5/8, 3/8: the other two are never drawn
    freq = torch.bincount(pick_next(logits, top_p=0.7, draw=draw), minlength=4).float() / len(logits)
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0, 0]), atol=0.015)
    assert torch.equal(pick_next(logits[:2], greedy=True), torch.tensor([0, 0]))


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="rollout_backend='vllm'"):
        make_config("embedded", overrides=dict(rollout_backend="vllm"))


def test_shared_prompt_prefix_prefilled_once_same_completions():
    """Contexts that start with the same 12 tokens (an instruction and worked examples do): that part is
    forwarded once (batch 1), the rest per context, and greedy completions equal transformers' generate."""
    model, tok = tiny_random(seed=1)
    model.eval()
    head = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]
    contexts = [head + [5, 6, 7], head + [10], head + [12, 13]]  # ragged tails: padding between head and tail
    shapes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[:2])))
    ours = sample(model, tok, contexts, 2, 6, greedy=True)
    hook.remove()
    assert shapes[0] == (1, 12) and shapes[1] == (3, 3), shapes[:2]
    ref = sample(model, tok, contexts, 2, 6, greedy=True, backend="hf")
    assert ours.completions == ref.completions


def test_non_finite_logits_are_one_line_not_a_torch_traceback():
    import pytest
    import torch

    from tokeneff.errors import TokeneffError
    from tokeneff.rollout import pick_next

    for draw in ("multinomial", "inverse-cdf"):
        with pytest.raises(TokeneffError, match="not finite"):
            pick_next(torch.full((2, 5), float("nan")), draw=draw)
        assert pick_next(torch.tensor([[0.0, 50.0, 0.0]]), draw=draw).tolist() == [1]
        # a token of zero mass (-inf) is never drawn, whatever the uniform: not the last, not past the end
        assert set(pick_next(torch.tensor([[0.0, float("-inf")]]).expand(2000, 2), draw=draw).tolist()) == {0}
        assert set(pick_next(torch.tensor([[float("-inf"), 0.0]]).expand(2000, 2), draw=draw).tolist()) == {1}


def _model_where_rows_stop_at_different_steps():
    """The tiny model with EOS set to a token that greedy decoding emits in two of the three contexts, at different
    steps, and not in the third: with G = 3, six of nine rows stop, three at each of two steps."""
    model, tok = tiny_random(seed=1)
    model.eval()
    free = sample(model, tok, CONTEXTS, 1, 10, greedy=True).completions
    first = [{t: row.index(t) for t in set(row[1:9])} for row in free]
    eos = next(t for t in sorted(set().union(*first)) if sum(t in f for f in first) == 2
               and len({f[t] for f in first if t in f}) == 2)
    model.generation_config.eos_token_id = eos
    tok.eos_token_id = eos
    return model, tok


# forwards after the prefill of the 3 contexts, for tokens 1 to 9 (3 rows stop at token 3, 3 more at token 6):
# sliced runs the rows still running, as the eager loop does; static keeps all 9 while more than half run
BATCHES = dict(sliced=[9] * 2 + [6] * 3 + [3] * 4, static=[9] * 5 + [3] * 4)


@pytest.mark.parametrize("backend", ["sliced", "static"])
def test_preallocated_backends_greedy_match_tokeneff_and_drop_finished_rows(backend):
    model, tok = _model_where_rows_stop_at_different_steps()
    want = sample(model, tok, CONTEXTS, 3, 10, greedy=True, backend="tokeneff")
    sizes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    got = sample(model, tok, CONTEXTS, 3, 10, greedy=True, backend=backend)
    hook.remove()
    assert got.completions == want.completions and got.truncated == want.truncated
    assert torch.equal(got.completion_ids, want.completion_ids)
    assert sorted(len(c) for c in got.completions) == [3] * 3 + [6] * 3 + [10] * 3 and sum(got.truncated) == 3
    assert sizes[0] == 3 and sizes[1:] == BATCHES[backend], sizes


@pytest.mark.parametrize("backend,head,merge", [("sliced", 0, True), ("sliced", 12, True), ("sliced", 12, False),
                                                ("static", 0, True), ("static", 12, True)])
def test_preallocated_backends_sampled_logprobs_equal_the_training_forward(monkeypatch, backend, head, merge):
    """With LoRA merged for sampling (or not: sliced's fused step then adds the adapter's update beside each
    product), the sampler's log pi(token) at every sampled token equals what the loss (SelectiveLogProbs on the
    unmerged adapter) computes, and sampling leaves the trained weights untouched. With `head` tokens every context
    starts with, sliced attends to them once for all rows (tokeneff.attention)."""
    from peft import LoraConfig, get_peft_model

    import tokeneff.attention as attention
    import tokeneff.rollout as rollout
    from tokeneff.loss import SelectiveLogProbs

    contexts = [list(range(20, 20 + head)) + c for c in CONTEXTS]
    prefix_steps = []
    real_attention = attention.shared_prefix_attention
    monkeypatch.setattr(attention, "shared_prefix_attention", lambda *a, shared_prefix=None, **kw: (
        prefix_steps.append(shared_prefix[0][0].shape[1]) if shared_prefix else None,
        real_attention(*a, shared_prefix=shared_prefix, **kw))[1])

    model, tok = tiny_random(seed=1)
    torch.manual_seed(0)  # LoRA's A is drawn from the global generator
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # B starts at zero: make the adapter change the model
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    temperature, G = 0.8, 4
    torch.manual_seed(1)
    free = sample(policy, tok, contexts, G, 8, temperature, backend=backend).completions
    # four frequent tokens end a completion: rows stop at various steps, most before the end
    eos = [t for t, _ in Counter(t for row in free for t in row[1:6]).most_common(4)]
    policy.generation_config.eos_token_id = eos
    tok.eos_token_id = eos[0]
    steps = []
    real_pick = rollout.pick_next
    monkeypatch.setattr(rollout, "pick_next", lambda logits, **kw: steps.append(logits) or real_pick(logits, **kw))
    torch.manual_seed(2)
    roll = sample(policy, tok, contexts, G, 8, temperature, backend=backend, merge_lora=merge)
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    comps = roll.completions
    assert 1 < len({len(c) for c in comps}) and any(c[-1] in eos for c in comps)
    # the sampler's rows at each step: the ones still running (static: all until at most half of them run)
    sampler_lp, batch = {}, list(range(len(comps)))
    for t, logits in enumerate(steps):
        assert len(logits) == len(batch)
        lp = torch.log_softmax(logits.float() / temperature, -1)
        for i, r in enumerate(batch):
            if t < len(comps[r]):
                sampler_lp[r, t] = lp[i, comps[r][t]]
        running = [r for r in batch if len(comps[r]) > t + 1]
        batch = running if backend == "sliced" or 2 * len(running) <= len(batch) else batch
    assert head or len(steps[-1]) < len(comps), "rows should have left the batch"  # (static with head: they don't)
    assert set(prefix_steps) == ({head} if head and backend == "sliced" else set()), \
        "sliced attends once to a prefix every context shares"
    cells = sorted(sampler_lp)
    policy.eval()
    with torch.no_grad():
        train_lp = SelectiveLogProbs(policy, temperature=temperature)(
            roll.context_ids, roll.context_mask, roll.completion_ids, roll.completion_mask,
            torch.arange(len(comps)) // G, torch.tensor([r for r, _ in cells]), torch.tensor([t for _, t in cells]))
    assert len(cells) == sum(len(c) for c in comps)
    torch.testing.assert_close(torch.stack([sampler_lp[c] for c in cells]), train_lp, rtol=0, atol=1e-4)


def test_rollout_options_are_checked():
    cfg = make_config("embedded", overrides=dict(rollout_backend="static", rollout_compile="true",
                                                 rollout_merge_lora="yes"))
    assert cfg.rollout_options() == dict(backend="static", compile=True, merge_lora=True, dtype="float32",
                                         gemm="auto", attention="auto", step="auto")
    for over, msg in ((dict(rollout_compile="maybe"), "rollout_compile='maybe': expected bool"),
                      (dict(rollout_backend="tokeneff", rollout_compile=True),
                       "rollout_compile=True: applies to rollout_backend=static only"),
                      (dict(rollout_compile=True), "rollout_compile=True: applies to rollout_backend=static only "
                                                   "(it is 'sliced')"),
                      (dict(rollout_backend="hf", rollout_merge_lora=1),
                       "rollout_merge_lora=True: applies to rollout_backend=static or sliced only")):
        with pytest.raises(ConfigError, match=re.escape(msg)) as e:
            make_config("embedded", overrides=over)
        assert "\n" not in str(e.value)
    bad = dataclasses.replace(cfg, rollout_compile="yes")  # built in code, not parsed: still refused
    with pytest.raises(ConfigError, match="rollout_compile='yes': must be true or false"):
        bad.validate()


@pytest.mark.slow
def test_compiled_static_step_decodes_as_the_eager_one():
    model, tok = _model_where_rows_stop_at_different_steps()
    want = sample(model, tok, CONTEXTS, 3, 10, greedy=True, backend="static").completions
    torch._dynamo.utils.counters.clear()
    assert sample(model, tok, CONTEXTS, 3, 10, greedy=True, backend="static", compile=True).completions == want
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "the step should have run compiled"


def test_bfloat16_rollout_samples_the_merged_model_cast_to_bfloat16_and_leaves_the_weights():
    """rollout_dtype=bfloat16: the sampler's tokens are those of the adapter merged into a copy of the model cast
    to bfloat16 (built here with peft's own merge), and the float32 weights training owns stay as they were."""
    import copy

    policy, tok = policy_with_a_live_adapter()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    got = sample(policy, tok, CONTEXTS, 2, 10, greedy=True, dtype="bfloat16")
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in policy.named_parameters())
    ref_model = copy.deepcopy(policy).merge_and_unload().to(torch.bfloat16)
    want = sample(ref_model, tok, CONTEXTS, 2, 10, greedy=True)
    assert got.completions == want.completions
    with policy.disable_adapter():
        base = sample(policy, tok, CONTEXTS, 2, 10, greedy=True, dtype="bfloat16")
    assert got.completions != base.completions, "the adapter should change what the model writes"


def test_bfloat16_casts_are_kept_between_rollouts_until_a_weight_changes():
    policy, tok = policy_with_a_live_adapter()
    sample(policy, tok, CONTEXTS, 2, 6, greedy=True, dtype="bfloat16")
    casts = {k: t for k, (_, t) in policy.__dict__["_tokeneff_casts"].items()}
    assert casts and all(t.dtype == torch.bfloat16 for t in casts.values())
    sample(policy, tok, CONTEXTS, 2, 6, greedy=True, dtype="bfloat16")
    assert all(policy.__dict__["_tokeneff_casts"][k][1] is t for k, t in casts.items()), "the casts should be reused"
    head = policy.get_base_model().lm_head.weight
    with torch.no_grad():
        head.mul_(-1)  # as an optimizer step would change a trained weight: in place
    flipped = sample(policy, tok, CONTEXTS, 2, 6, greedy=True, dtype="bfloat16")
    now = policy.__dict__["_tokeneff_casts"]
    assert len(now) == len(casts), "the stale cast should have been dropped, not kept beside the new one"
    with torch.no_grad():
        head.mul_(-1)
    ref = sample(policy, tok, CONTEXTS, 2, 6, greedy=True, dtype="bfloat16")
    assert flipped.completions != ref.completions, "sampling should have seen the changed weight"


def _linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def test_onednn_products_agree_with_torch_and_the_layers_are_restored():
    """rollout_gemm=onednn: while sampling every linear layer (adapters and LM head too) multiplies through oneDNN on
    a packed weight; its logits are torch's to float32 rounding, and afterwards the layers are torch's again."""
    from tokeneff.kernels import onednn_linears

    policy, tok = policy_with_a_live_adapter()
    ids = torch.tensor([CONTEXTS[0]])
    with torch.no_grad():
        want = policy(input_ids=ids).logits
        with onednn_linears(policy):
            assert all("forward" in m.__dict__ for m in _linears(policy))
            got = policy(input_ids=ids).logits
        assert not any("forward" in m.__dict__ for m in _linears(policy))
        assert torch.equal(policy(input_ids=ids).logits, want)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    ours = sample(policy, tok, CONTEXTS, 2, 10, greedy=True, gemm="onednn")
    assert ours.completions == sample(policy, tok, CONTEXTS, 2, 10, greedy=True, gemm="torch").completions


@pytest.mark.parametrize("backend, gemm, expect", [("sliced", "auto", True), ("static", "auto", False),
                                                   ("static", "onednn", True), ("sliced", "torch", False)])
def test_rollout_gemm_auto_picks_onednn_for_sliced_on_a_cpu(backend, gemm, expect):
    model, tok = tiny_random(seed=1)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append("forward" in m.__dict__))
    sample(model, tok, CONTEXTS, 2, 4, greedy=True, backend=backend, gemm=gemm)
    hook.remove()
    assert seen and set(seen) == {expect}


def test_packed_weights_are_kept_between_rollouts_until_a_weight_changes():
    from tokeneff.kernels import _PACKED

    policy, tok = policy_with_a_live_adapter()
    sample(policy, tok, CONTEXTS, 2, 6, greedy=True)
    weights = [m.weight for m in _linears(policy)]
    packed = [_PACKED[w][1] for w in weights]
    sample(policy, tok, CONTEXTS, 2, 6, greedy=True)
    assert all(_PACKED[w][1] is p for w, p in zip(weights, packed, strict=True)), "the copies should be reused"
    lora_b = next(p for n, p in policy.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.mul_(-3)  # as an optimizer step changes a trained weight: in place
    changed = sample(policy, tok, CONTEXTS, 2, 6, greedy=True)
    old = next(p for w, p in zip(weights, packed, strict=True) if w is lora_b)
    assert _PACKED[lora_b][1] is not old, "the changed weight should be packed anew"
    assert changed.completions == sample(policy, tok, CONTEXTS, 2, 6, greedy=True, gemm="torch").completions


def test_rollout_gemm_is_checked():
    from tokeneff.errors import TokeneffError

    model, tok = tiny_random(seed=1)
    with pytest.raises(TokeneffError, match="rollout_gemm='mkl': must be one of auto, onednn, torch"):
        sample(model, tok, CONTEXTS, 1, 2, gemm="mkl")
    for over, msg in ((dict(rollout_gemm="blas"), "rollout_gemm='blas': must be one of auto, onednn, torch"),
                      (dict(train_gemm="mkl"), "train_gemm='mkl': must be one of auto, onednn, torch"),
                      (dict(rollout_backend="hf", rollout_gemm="onednn"),
                       "rollout_gemm='onednn': applies to rollout_backend=static or sliced only")):
        with pytest.raises(ConfigError, match=msg):
            make_config("embedded", overrides=over)
    assert make_config("embedded", overrides=dict(rollout_backend="hf", rollout_gemm="auto"))


HEAD = list(range(20, 32))  # 12 tokens every context starts with, as an instruction and worked examples do


@pytest.mark.parametrize("attention, shared", [("auto", True), ("shared-prefix", True), ("sdpa", False)])
def test_rollout_attention_keeps_the_shared_prefix_once_and_decodes_the_same(monkeypatch, attention, shared):
    import tokeneff.rollout as rollout

    model, tok = tiny_random(seed=1)
    contexts = [HEAD + c for c in CONTEXTS]
    caches = []
    real = rollout._sliced_cache
    monkeypatch.setattr(rollout, "_sliced_cache", lambda *a: caches.append(real(*a)) or caches[-1])
    got = sample(model, tok, contexts, 2, 8, greedy=True, attention=attention)
    assert [layer.prefix[0].shape[1] for layer in caches[0].layers] == [12 if shared else 0] * 2
    assert model.config._attn_implementation == "sdpa", "the model's own attention is put back"
    assert got.completions == sample(model, tok, contexts, 2, 8, greedy=True, backend="tokeneff").completions
    with pytest.raises(TokeneffError, match="rollout_attention='flash': must be one of auto, shared-prefix, sdpa"):
        sample(model, tok, contexts, 1, 2, attention="flash")
    for over, msg in ((dict(rollout_attention="cascade"),
                       "rollout_attention='cascade': must be one of auto, shared-prefix, sdpa"),
                      (dict(rollout_backend="static", rollout_attention="shared-prefix"),
                       "rollout_attention='shared-prefix': applies to rollout_backend=sliced only")):
        with pytest.raises(ConfigError, match=msg):
            make_config("embedded", overrides=over)
    assert make_config("embedded", overrides=dict(rollout_backend="hf", rollout_attention="sdpa"))


def test_rollout_dtype_is_checked():
    from tokeneff.errors import TokeneffError

    model, tok = tiny_random(seed=1)
    with pytest.raises(TokeneffError, match="rollout_dtype='float16': must be one of float32, bfloat16"):
        sample(model, tok, CONTEXTS, 1, 2, dtype="float16")
    for over, msg in ((dict(rollout_backend="static", rollout_dtype="fp8"),
                       "rollout_dtype='fp8': must be one of float32, bfloat16"),
                      (dict(rollout_backend="tokeneff", rollout_dtype="bfloat16"),
                       "rollout_dtype='bfloat16': applies to rollout_backend=static or sliced only")):
        with pytest.raises(ConfigError, match=msg):
            make_config("embedded", overrides=over)
    cfg = make_config("embedded", overrides=dict(rollout_dtype="bfloat16"))  # the default backend, sliced
    assert cfg.rollout_options()["dtype"] == "bfloat16" and cfg.rollout_options(evaluation=True)["dtype"] == "float32"


def test_sliced_refuses_a_model_with_sliding_window_layers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tokeneff.errors import TokeneffError

    _, tok = tiny_random(seed=1)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
                      max_window_layers=1)
    model = Qwen2ForCausalLM(cfg).eval()
    with pytest.raises(TokeneffError, match="rollout_backend=sliced: the model has DynamicSlidingWindowLayer"):
        sample(model, tok, CONTEXTS, 2, 4)
    assert len(sample(model, tok, CONTEXTS, 2, 4, backend="tokeneff").completions) == 6


@pytest.mark.parametrize("step", ["transformers", "fused"])
def test_sliced_decodes_a_model_that_attends_eagerly_as_the_eager_loop_does(step):
    """Eager attention adds its mask to the scores: sliced's boolean mask must reach it as 0 / -inf, or padding is
    attended (transformers' own step); the fused step attends by SDPA whatever the model's setting."""
    model, tok = tiny_random(seed=1)
    model.set_attn_implementation("eager")
    contexts = [HEAD + c for c in CONTEXTS]
    want = sample(model, tok, contexts, 2, 8, greedy=True, backend="tokeneff").completions
    assert sample(model, tok, contexts, 2, 8, greedy=True, step=step).completions == want
