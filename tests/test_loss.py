import torch
from peft import LoraConfig, get_peft_model
from torch.testing import assert_close

from tokeneff.loss import SelectiveLogProbs, policy_loss, width_buckets
from tokeneff.models import tiny_random
from tokeneff.rollout import left_pad


def _setup(seed=0):
    model, tok = tiny_random(seed=seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, init_lora_weights=False))
    ctx_ids, ctx_mask = left_pad([[5, 6, 7, 8], [9, 10]], tok.pad_token_id)  # two prompts, one left-padded
    g = torch.Generator().manual_seed(seed)
    comp_ids = torch.randint(3, 90, (4, 5), generator=g)  # rows 0,1 continue prompt 0; rows 2,3 prompt 1
    comp_mask = torch.ones_like(comp_ids)
    comp_mask[3, 3:] = 0
    row_ctx = torch.tensor([0, 0, 1, 1])
    return model, ctx_ids, ctx_mask, comp_ids, comp_mask, row_ctx


def _reference_logp(model, ctx_ids, ctx_mask, comp_ids, comp_mask, row_ctx, rows, pos, temperature=1.0):
    """Direct formula: full sequences, full logits, log_softmax, pick the sampled tokens."""
    ids = torch.cat([ctx_ids[row_ctx], comp_ids], 1)
    mask = torch.cat([ctx_mask[row_ctx], comp_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    logp = torch.log_softmax(logits.float() / temperature, -1)
    p = ctx_ids.shape[1]
    return logp[rows, p + pos - 1, comp_ids[rows, pos]]


def test_selective_logprobs_match_full_forward_both_paths():
    model, *batch = _setup()
    rows, pos = torch.tensor([0, 1, 1, 2, 3, 3]), torch.tensor([0, 2, 4, 1, 0, 2])
    expected = _reference_logp(model, *batch, rows, pos)
    for share in (True, False):
        for truncate in (True, False):
            for tile in (8192, 7):  # 7: the 93-token vocabulary in 14 tiles, folded by an online logsumexp
                lp = SelectiveLogProbs(model, vocab_tile=tile, share_prompt=share, truncate=truncate)
                assert_close(lp(*batch, rows, pos), expected, rtol=1e-4, atol=1e-5)
    hot = _reference_logp(model, *batch, rows, pos, temperature=0.7)
    assert_close(SelectiveLogProbs(model, temperature=0.7)(*batch, rows, pos), hot, rtol=1e-4, atol=1e-5)


def test_width_buckets_known_answer():
    need = torch.tensor([0, 10, 4, 6, 0, 9, 5])
    got = [(b.tolist(), w) for b, w in width_buckets(need)]
    # from the widest (10): rows needing >= 5 join it; 4 starts a bucket; rows needing nothing form their own
    assert got == [([1, 3, 5, 6], 10), ([2], 4), ([0, 4], 0)]
    assert [(b.tolist(), w) for b, w in width_buckets(need, min_fill=1.0)] == [
        ([1], 10), ([5], 9), ([3], 6), ([6], 5), ([2], 4), ([0, 4], 0)]


def test_each_row_is_forwarded_only_to_its_last_credited_position():
    model, *batch = _setup()
    rows, pos = torch.tensor([0, 1, 1, 2, 3, 3]), torch.tensor([0, 2, 4, 1, 0, 2])  # reach per row: 0, 4, 1, 2
    shapes = []
    hook = model.get_base_model().model.embed_tokens.register_forward_hook(lambda m, i, o: shapes.append(
        tuple(o.shape[:2])))
    SelectiveLogProbs(model)(*batch, rows, pos)
    hook.remove()
    # the two prompts once; rows 1 and 3 to 4 tokens (3 needs 2 >= half of 4); row 2 to 1 token; row 0 not at all
    assert shapes == [(2, 4), (2, 4), (1, 1)]


def test_policy_gradient_matches_direct_formula():
    model, *batch = _setup(1)
    rows, pos = torch.tensor([0, 0, 2, 3]), torch.tensor([1, 3, 0, 2])
    adv, w = torch.tensor([1.0, 1.0, -0.5, 2.0]), torch.tensor([0.25, 0.25, 0.5, 0.1])
    params = [p for p in model.parameters() if p.requires_grad]

    loss, _ = policy_loss(SelectiveLogProbs(model, vocab_tile=16)(*batch, rows, pos), adv, w)
    assert_close(loss, -(w * adv).sum())  # the ratio pi / sg(pi) is 1 in value
    got = torch.autograd.grad(loss, params)

    direct = -(w * adv * _reference_logp(model, *batch, rows, pos)).sum()
    want = torch.autograd.grad(direct, params)
    for g1, g2 in zip(got, want):
        assert_close(g1, g2, rtol=1e-4, atol=1e-5)  # float32 sums in another order: ~1e-6 apart


def test_k3_kl_value_and_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.5, -2.0, -0.2])
    w = torch.tensor([0.5, 0.25, 0.25])
    loss, kl = policy_loss(logp, torch.zeros(3), w, ref, beta=0.1)
    d = ref - logp.detach()
    assert_close(kl, (w * (d.exp() - d - 1)).sum())
    loss.backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    assert_close(logp.grad, 0.1 * w * (1 - d.exp()))
    assert kl >= 0


def test_policy_loss_without_beta_has_no_kl_term_even_with_a_reference():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-3.0, -0.5])
    loss, kl = policy_loss(logp, torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.5]), ref)
    assert_close(loss, torch.tensor(0.0))  # -(0.5 * 1 + 0.5 * -1): the KL (> 0 here) is logged, not in the loss
    assert kl > 0


def test_gradient_checkpointing_gives_the_same_logprobs_and_gradients_without_a_shared_prompt():
    """Checkpointing recomputes each layer in backward, which a prompt KV cache shared across rows cannot survive:
    the loss must detect it (through peft's wrapper) and forward each row with its prompt, same numbers."""
    model, *batch = _setup()
    rows, pos = torch.tensor([0, 1, 1, 2, 3, 3]), torch.tensor([0, 2, 4, 1, 0, 2])
    model.train()  # checkpointing acts in training mode only (lora_dropout is 0: no randomness)

    def run():
        model.zero_grad()
        shapes = []
        hook = model.get_base_model().model.embed_tokens.register_forward_hook(
            lambda m, i, o: shapes.append(tuple(o.shape[:2])))
        lp = SelectiveLogProbs(model)(*batch, rows, pos)
        hook.remove()
        lp.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return lp.detach(), grads, shapes

    plain, g_plain, shapes_plain = run()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    ckpt, g_ckpt, shapes_ckpt = run()
    assert_close(ckpt, plain, rtol=1e-4, atol=1e-5)
    assert g_plain.keys() == g_ckpt.keys() and any(g.abs().sum() > 0 for g in g_plain.values())
    for n in g_plain:
        assert_close(g_ckpt[n], g_plain[n], rtol=1e-4, atol=1e-5)  # float32 sums in another order
    assert shapes_plain == [(2, 4), (2, 4), (1, 1)]  # without checkpointing: the two prompts once, then completions
    # with it, each row with its own prompt (4 tokens) up to its reach: rows 1 and 3 to 4, row 2 to 1, row 0 to 0
    assert shapes_ckpt == [(2, 8), (1, 5), (1, 4)]
