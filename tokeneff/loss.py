"""Log-probabilities at selected positions only, and the shared policy-gradient loss.

Why: the LM head and log-softmax over a 150k vocabulary dominate activation memory when applied at every
position. We run the transformer body, gather the hidden states of the credited positions, and apply the
head there alone through TRL's chunked log-prob kernel (`trl.kernels.ChunkedLogProbFunction`: vocabulary
tiles with an online logsumexp, recomputed in backward, so no [N, V] logits are ever held; Triton on GPU,
torch ops elsewhere). Completion columns after the last credited position are never forwarded, and each
prompt is forwarded once for its whole group (its KV cache is shared, with gradients flowing back through
it), not G times.
"""

from __future__ import annotations

import torch
from torch import nn
from trl.kernels import ChunkedLogProbFunction

from .rollout import prefill


def head_logp(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab_tile: int = 8192,
              temperature: float = 1.0) -> torch.Tensor:
    """log softmax(head(hidden) / T)[targets] in float32, never materialising more than one vocabulary tile."""
    head = model.get_output_embeddings()
    cfg = model.config.get_text_config()
    return ChunkedLogProbFunction.apply(hidden, head.weight, head.bias, targets, temperature, vocab_tile,
                                        getattr(cfg, "final_logit_softcapping", None), 1.0, ())[0]


class SelectiveLogProbs(nn.Module):
    """Wraps a causal LM (peft or plain) so that one `forward` gives log pi(y_t | x, y_<t) at chosen cells.

    An `nn.Module` so that accelerate can wrap it for data-parallel training.
    """

    def __init__(self, model: nn.Module, vocab_tile: int = 8192, share_prompt: bool = True, truncate: bool = True,
                 temperature: float = 1.0):
        super().__init__()
        self.model, self.vocab_tile, self.temperature = model, vocab_tile, temperature
        # share_prompt / truncate exist so that `tokeneff bench` can say what each saving is worth
        self.share_prompt, self.truncate = share_prompt, truncate

    def forward(self, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, comp_ids: torch.Tensor,
                comp_mask: torch.Tensor, row_ctx: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """log-prob of comp_ids[rows, pos]; comp row r continues context row_ctx[r]. Returns float32 [N]."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        width = int(pos.max()) if len(pos) else 0  # completion tokens needed as inputs: 0 .. max(pos) - 1
        if not self.truncate:
            width = comp_ids.shape[1]
        c_ids, c_mask = comp_ids[:, :width], comp_mask[:, :width]
        checkpointed = getattr(base, "is_activation_checkpointing", None)
        if checkpointed is None:  # transformers < 5
            checkpointed = getattr(base, "is_gradient_checkpointing", False)
        if self.share_prompt and not checkpointed:
            h_ctx, cache = prefill(self.model, ctx_ids, ctx_mask, use_cache=width > 0)
            h_last = h_ctx[row_ctx, -1]
            h_comp = None
            if width:
                cache.reorder_cache(row_ctx)  # each completion row gets its context's keys/values
                mask = torch.cat([ctx_mask[row_ctx], c_mask], 1)
                start = ctx_mask[row_ctx].sum(-1, keepdim=True)
                position_ids = start + torch.arange(width, device=c_ids.device)[None]
                h_comp = base.get_decoder()(input_ids=c_ids, attention_mask=mask, position_ids=position_ids,
                                            past_key_values=cache, use_cache=True).last_hidden_state
        else:  # one plain forward over [context | completion] rows (needed with gradient checkpointing)
            ids = torch.cat([ctx_ids[row_ctx], c_ids], 1)
            mask = torch.cat([ctx_mask[row_ctx], c_mask], 1)
            h, _ = prefill(self.model, ids, mask, use_cache=False)
            p = ctx_ids.shape[1]
            h_last, h_comp = h[:, p - 1], h[:, p:] if width else None
        # hidden state that predicts completion token t: the context's last for t = 0, else completion t - 1
        hidden = h_last[rows] if h_comp is None else torch.cat([h_last[:, None], h_comp], 1)[rows, pos]
        return head_logp(base, hidden, comp_ids[rows, pos], self.vocab_tile, self.temperature)


def policy_loss(logp: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor,
                ref_logp: torch.Tensor | None = None, beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """-sum w * A * pi/sg(pi) + beta * sum w * KL_k3; returns (loss, weighted KL).

    The ratio is 1 in value, so the gradient is -sum w * A * grad log pi (on-policy, one update per batch).
    k3 estimator (Schulman): KL ~ exp(ref - logp) - (ref - logp) - 1, unbiased and non-negative.
    """
    ratio = torch.exp(logp - logp.detach())
    loss = -(weight * adv * ratio).sum()
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = (weight * (torch.exp(d) - d - 1)).sum()
        loss = loss + beta * kl
    return loss, kl.detach()
