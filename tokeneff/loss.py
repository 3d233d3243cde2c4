"""Log-probabilities at selected positions only, and the shared policy-gradient loss.

Why: the LM head and log-softmax over a 150k vocabulary dominate activation memory when applied at every
position. We run the transformer body, gather the hidden states of the credited positions, and apply the
head there alone, in chunks whose logits are recomputed in backward; columns after the last credited
position of a micro-batch are never forwarded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _head_logp(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


class SelectiveLogProbs(nn.Module):
    """Wraps a causal LM (peft or plain) so one `forward` gives log pi(y_t | y_<t) at chosen cells.

    It is an `nn.Module` so that accelerate can wrap it for data-parallel training.
    """

    def __init__(self, model: nn.Module, chunk: int = 1024):
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor:
        """log-prob of input_ids[rows, cols] given everything before it; returns a float32 [N] tensor."""
        width = int(cols.max()) if len(cols) else 1  # the last needed hidden state is at column max(cols) - 1
        ids, mask = input_ids[:, :width], attention_mask[:, :width]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as in generate(), with left padding
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state
        h = hidden[rows, cols - 1]
        targets = input_ids[rows, cols]
        head = base.get_output_embeddings()
        if len(rows) <= self.chunk:
            return _head_logp(head, h, targets)
        parts = [checkpoint(_head_logp, head, hc, tc, use_reentrant=False)
                 for hc, tc in zip(h.split(self.chunk), targets.split(self.chunk), strict=True)]
        return torch.cat(parts)


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
