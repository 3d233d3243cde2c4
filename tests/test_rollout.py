from collections import Counter

import pytest
import torch

from tokeneff import make_config
from tokeneff.config import ConfigError
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


def test_pick_next_draws_from_tempered_softmax_and_nucleus():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[None].expand(20000, 4)
    for temperature in (1.0, 0.5):
        freq = torch.bincount(pick_next(logits, temperature), minlength=4).float() / len(logits)
        assert torch.allclose(freq, torch.softmax(logits[0] / temperature, -1), atol=0.015)
    # top-p 0.7: the nucleus is {0.5, 0.3}, renormalised to 5/8, 3/8
    freq = torch.bincount(pick_next(logits, top_p=0.7), minlength=4).float() / len(logits)
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

    from tokeneff.config import TokeneffError
    from tokeneff.rollout import pick_next

    with pytest.raises(TokeneffError, match="not finite"):
        pick_next(torch.full((2, 5), float("nan")))
    assert pick_next(torch.tensor([[0.0, 50.0, 0.0]])).tolist() == [1]
