"""The fused decode step (rollout_step=fused): the model's own logits, from stacked weights and LoRA beside them."""

import pytest
import torch

from tokeneff.config import make_config
from tokeneff.errors import ConfigError, TokeneffError
from tokeneff.models import tiny_random
from tokeneff.rollout import sample

HEAD = list(range(20, 32))  # every context starts with these, as a task's instruction does
CONTEXTS = [HEAD + [40, 41, 42], HEAD + [43, 44], HEAD + [45, 46, 47, 48]]


def _llama(vocab: int, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, **extra)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return LlamaForCausalLM(cfg)


def _adapted(model, targets):
    """`model` under a fresh LoRA adapter whose B is not zero (so that leaving the adapter out changes the logits), at
    a scale (alpha / r = 1.75) that rounds: multiplying B by it first would change the last bits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=7, target_modules=targets))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return policy


def _steps(monkeypatch, model, tok, **kw):
    """Greedy completions and the logits of every step."""
    import tokeneff.rollout as rollout

    seen = []
    real = rollout.pick_next
    monkeypatch.setattr(rollout, "pick_next", lambda logits, **k: seen.append(logits.clone()) or real(logits, **k))
    got = sample(model, tok, CONTEXTS, 2, 6, greedy=True, **kw).completions
    monkeypatch.setattr(rollout, "pick_next", real)
    return got, seen


def _count_fused(monkeypatch) -> list:
    import tokeneff.fused_step as fs

    calls = []
    real = fs.FusedStep.__call__
    monkeypatch.setattr(fs.FusedStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("gemm", ["auto", "torch"])
def test_fused_step_gives_the_models_own_logits_with_the_adapter_beside_the_products(monkeypatch, family, gemm):
    """Qwen2 (biased q, k, v) and Llama with every bias on; the adapter on some of the stacked layers only (zero
    blocks beside theirs); oneDNN's products (auto) and torch's: every step's logits are transformers' within float32
    rounding (bit for bit at SmolLM2-135M's shapes on this project's CPU; ~1e-6 apart where a stacked width falls on
    a kernel's tail, as at these tiny ones), the greedy completions the same, and different from the model's without
    its adapter."""
    _, tok = tiny_random(seed=1)
    model = tiny_random(seed=1)[0] if family == "qwen2" else _llama(len(tok), attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # initialised to zero: make each one count
                p.normal_(std=0.3)
    plain, _ = _steps(monkeypatch, model.eval(), tok, gemm=gemm, step="transformers")
    policy = _adapted(model, ["q_proj", "v_proj", "up_proj", "down_proj"]).eval()
    calls = _count_fused(monkeypatch)
    fused, fused_logits = _steps(monkeypatch, policy, tok, gemm=gemm, step="fused")
    assert len(calls) == 5, "every step after the prefill's ran fused"
    ref, ref_logits = _steps(monkeypatch, policy, tok, gemm=gemm, step="transformers")
    assert fused == ref and fused != plain
    for a, b in zip(fused_logits, ref_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_stacked_weights_are_kept_until_a_weight_changes(monkeypatch):
    from tokeneff.fused_step import FusedStep

    model, tok = tiny_random(seed=1)
    policy = _adapted(model, ["q_proj", "v_proj"]).eval()
    first, again = FusedStep(model, onednn=True), FusedStep(model, onednn=True)
    assert first.layers[0][1].weight is again.layers[0][1].weight, "q, k and v are stacked once"
    k = model.model.layers[0].self_attn.k_proj.weight
    with torch.no_grad():
        k.mul_(-1.0)  # in place (a new version), as an optimizer step changes a weight
    assert FusedStep(model, onednn=True).layers[0][1].weight is not first.layers[0][1].weight
    fused, fused_logits = _steps(monkeypatch, policy, tok, step="fused")
    ref, ref_logits = _steps(monkeypatch, policy, tok, step="transformers")
    assert fused == ref
    torch.testing.assert_close(fused_logits[1], ref_logits[1], rtol=0, atol=2e-5)


def test_stacked_copies_of_weights_made_for_one_rollout_are_dropped_after_it():
    """A merged (or bfloat16) sampling copy of q, k, v lives for one rollout: what was stacked from it must not pile up
    from rollout to rollout (a leak of the whole stacked model per update)."""
    from tokeneff.fused_step import _STACKED

    model, tok = tiny_random(seed=1)
    policy = _adapted(model, ["q_proj", "v_proj"]).eval()
    sizes = []
    for _ in range(3):
        sample(policy, tok, CONTEXTS, 2, 3, merge_lora=True)
        sizes.append(len(_STACKED[model]))
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_the_fused_step_serves_the_families_it_knows_and_auto_leaves_the_others(monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = tiny_random(seed=1)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128)).eval()
    with pytest.raises(TokeneffError, match="rollout_step=fused: model type 'gpt2' is not one of llama, qwen2; use "
                                            "rollout_step=auto or transformers"):
        sample(gpt2, tok, CONTEXTS, 2, 4, step="fused")
    calls = _count_fused(monkeypatch)
    auto = sample(gpt2, tok, CONTEXTS, 2, 4, greedy=True).completions
    assert not calls and auto == sample(gpt2, tok, CONTEXTS, 2, 4, greedy=True, step="transformers").completions
    dora = get_peft_model(tiny_random(seed=1)[0], LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).eval()
    biased = get_peft_model(tiny_random(seed=1)[0], LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True)).eval()
    for policy in (dora, biased):
        with pytest.raises(TokeneffError, match=r"rollout_step=fused: an adapter is not plain LoRA \(DoRA\? a LoRA"):
            sample(policy, tok, CONTEXTS, 2, 4, step="fused")
    with pytest.raises(TokeneffError, match="rollout_step='fast': must be one of auto, fused, transformers"):
        sample(gpt2, tok, CONTEXTS, 2, 4, step="fast")
    for over, msg in ((dict(rollout_step="fast"), "rollout_step='fast': must be one of auto, fused, transformers"),
                      (dict(rollout_backend="tokeneff", rollout_step="fused"),
                       "rollout_step='fused': applies to rollout_backend=sliced only")):
        with pytest.raises(ConfigError, match=msg):
            make_config("embedded", overrides=over)
    assert make_config("embedded", overrides=dict(rollout_backend="static", rollout_step="transformers"))


@pytest.mark.parametrize("gemm", ["auto", "torch"])
def test_a_merged_adapter_and_other_dtypes_reach_the_fused_step(monkeypatch, gemm):
    """Changes the kept copies cannot see by version: peft's merge_adapter and unmerge_adapter write into
    weight.data; a model cast to bfloat16 (its adapter kept in float32, as peft keeps it: computed in float32, as peft
    does) or to float16 (no oneDNN: torch's products). Each time the fused step's logits stay transformers'."""
    _, tok = tiny_random(seed=1)
    policy = _adapted(_llama(len(tok)), ["q_proj", "k_proj", "v_proj"]).eval()
    unmerged, _ = _steps(monkeypatch, policy, tok, gemm=gemm, step="transformers")
    _steps(monkeypatch, policy, tok, gemm=gemm, step="fused")  # stacks and packs q, k, v
    policy.merge_adapter()
    merged, merged_logits = _steps(monkeypatch, policy, tok, gemm=gemm, step="fused")
    assert merged == unmerged
    torch.testing.assert_close(merged_logits[2], _steps(monkeypatch, policy, tok, gemm=gemm, step="transformers")[1][2],
                               rtol=0, atol=2e-5)
    policy.unmerge_adapter()  # which writes into weight.data too: nothing stacked from merged weights may be kept
    again, again_logits = _steps(monkeypatch, policy, tok, gemm=gemm, step="fused")
    assert again == unmerged
    torch.testing.assert_close(again_logits[2], _steps(monkeypatch, policy, tok, gemm=gemm, step="transformers")[1][2],
                               rtol=0, atol=2e-5)
    for dtype in (torch.bfloat16, torch.float16):
        policy.get_base_model().to(dtype)
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
        fused, fused_logits = _steps(monkeypatch, policy, tok, gemm=gemm, step="fused")
        ref, ref_logits = _steps(monkeypatch, policy, tok, gemm=gemm, step="transformers")
        assert fused == ref and fused_logits[0].dtype == dtype
        for a, b in zip(fused_logits, ref_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=2**-6)  # one bfloat16 step at these logits (|l| < 4)
