"""oneDNN products for the linear layers (tokeneff.kernels): the same function as torch's, gradients included."""

import pytest
import torch
from helpers import policy_with_a_live_adapter

from tokeneff.kernels import _PACKED, onednn_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _policy():
    return policy_with_a_live_adapter(("q_proj", "v_proj", "down_proj"))[0]


def _loss_and_grads(policy, ids, probe):
    policy.zero_grad()
    loss = (policy(input_ids=ids).logits * probe).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


def test_backward_through_onednn_gives_torchs_loss_and_gradients():
    """With backward=True the frozen layers (and the LM head) run forward and backward through oneDNN; every LoRA
    weight, including those of the first layer, whose gradient passes back through all the later frozen layers,
    gets torch's gradient to float32 rounding."""
    policy = _policy()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    probe = torch.randn(policy(input_ids=ids).logits.shape, generator=torch.Generator().manual_seed(3))
    want_loss, want = _loss_and_grads(policy, ids, probe)
    linears = [m for m in policy.modules() if type(m) is torch.nn.Linear]
    with onednn_linears(policy, backward=True):
        patched = {m for m in linears if "forward" in m.__dict__}
        got_loss, got = _loss_and_grads(policy, ids, probe)
    assert patched == {m for m in linears if not m.weight.requires_grad}, "trainable layers keep torch's product"
    assert patched and not any("forward" in m.__dict__ for m in linears)
    assert any(_PACKED[m.weight][2] is not None for m in patched), "the backward should have used packed W^T"
    assert torch.allclose(got_loss, want_loss, rtol=1e-5)
    assert want.keys() == got.keys() and any("layers.0." in n for n in got)
    for name in want:
        assert want[name].abs().sum() > 0, name
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-6), name


def test_autocast_keeps_its_own_product():
    """Under mixed precision (autocast to bfloat16) a patched layer computes what torch's autocast computes."""
    policy = _policy()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = policy(input_ids=ids).logits
        with onednn_linears(policy, backward=True):
            got = policy(input_ids=ids).logits
    assert torch.equal(got, want)


def test_a_weight_changed_in_place_is_packed_anew():
    lin = torch.nn.Linear(8, 4)
    lin.requires_grad_(False)
    x = torch.randn(3, 8)
    with onednn_linears(lin):
        first = lin(x)
    with torch.no_grad():
        lin.weight.mul_(2)  # as an optimizer step changes a weight: in place, a new version
    with onednn_linears(lin):
        second = lin(x)
    assert torch.allclose(second - lin.bias, 2 * (first - lin.bias), rtol=1e-5, atol=1e-6)
