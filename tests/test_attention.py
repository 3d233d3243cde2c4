"""The decode step's attention over a shared prefix (tokeneff.attention) against softmax(q k^T / sqrt(d)) v written
out per row and head in float64, on hand-made tensors with grouped-query heads and masked columns."""

from types import SimpleNamespace

import pytest
import torch

from tokeneff.attention import shared_prefix_attention

ROWS, HEADS, KV_HEADS, DIM, PREFIX, OWN = 3, 6, 2, 8, 5, 4


def _direct(q, pk, pv, key, value, allowed):
    """out[r, t, h] = sum_j softmax_j(q[r, h, t] . k_j / sqrt(DIM)) v_j over [prefix | row r's columns allowed]."""
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], DIM, dtype=torch.float64)
    for r in range(q.shape[0]):
        for h in range(HEADS):
            g = h // (HEADS // KV_HEADS)
            keys = torch.cat([pk[g], key[r, g]]).double()
            vals = torch.cat([pv[g], value[r, g]]).double()
            for t in range(q.shape[2]):
                s = keys @ q[r, h, t].double() / DIM ** 0.5
                s[PREFIX:][~allowed[r, t]] = float("-inf")
                out[r, t, h] = torch.softmax(s, 0) @ vals
    return out


@pytest.mark.parametrize("q_len", [1, 2])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_shared_prefix_attention_is_softmax_attention_over_prefix_and_own_columns(kind, q_len):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(ROWS, HEADS, q_len, DIM, generator=g)
    pk, pv = torch.randn(2, KV_HEADS, PREFIX, DIM, generator=g)
    key, value = torch.randn(2, ROWS, KV_HEADS, OWN, DIM, generator=g)
    allowed = torch.ones(ROWS, q_len, OWN, dtype=torch.bool)
    allowed[0, :, :2] = False  # left padding of row 0
    allowed[2, :, 1] = False
    mask = allowed[:, None] if kind == "bool" else torch.zeros(ROWS, 1, q_len, OWN).masked_fill(
        ~allowed[:, None], float("-inf"))
    layer = SimpleNamespace(layer_idx=1, num_key_value_groups=HEADS // KV_HEADS, is_causal=True)
    prefixes = [None, (pk, pv)]  # layer 1's prefix
    out, _ = shared_prefix_attention(layer, q, key, value, mask, scaling=DIM ** -0.5, shared_prefix=prefixes)
    assert out.shape == (ROWS, q_len, HEADS, DIM)
    torch.testing.assert_close(out.double(), _direct(q, pk, pv, key, value, allowed), rtol=1e-5, atol=1e-6)


def test_without_a_prefix_it_is_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(1)
    q = torch.randn(ROWS, HEADS, 1, DIM, generator=g)
    key, value = torch.randn(2, ROWS, KV_HEADS, OWN, DIM, generator=g)
    layer = SimpleNamespace(layer_idx=0, num_key_value_groups=HEADS // KV_HEADS, is_causal=True)
    ours, _ = shared_prefix_attention(layer, q, key, value, None, scaling=0.3)
    assert torch.equal(ours, sdpa_attention_forward(layer, q, key, value, None, scaling=0.3)[0])


def test_bfloat16_inputs_give_bfloat16_output_close_to_float32():
    """bfloat16 sampling (rollout_dtype) passes bfloat16 queries and cache: the softmax still runs in float32."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(ROWS, HEADS, 1, DIM, generator=g)
    pk, pv = torch.randn(2, KV_HEADS, PREFIX, DIM, generator=g)
    key, value = torch.randn(2, ROWS, KV_HEADS, OWN, DIM, generator=g)
    layer = SimpleNamespace(layer_idx=0, num_key_value_groups=HEADS // KV_HEADS, is_causal=True)
    want, _ = shared_prefix_attention(layer, q, key, value, None, shared_prefix=[(pk, pv)])
    bf = [t.bfloat16() for t in (q, key, value, pk, pv)]
    got, _ = shared_prefix_attention(layer, *bf[:3], None, shared_prefix=[tuple(bf[3:])])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
