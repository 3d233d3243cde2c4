"""Log-probabilities at selected positions only, and the shared policy-gradient loss.

Why: the LM head and log-softmax over a 150k vocabulary dominate activation memory when applied at every
position. We run the transformer body, gather the hidden states of the credited positions, and apply the
head there alone through TRL's chunked log-prob kernel (`trl.kernels.ChunkedLogProbFunction`: vocabulary
tiles with an online logsumexp, recomputed in backward, so no [N, V] logits are ever held; Triton on GPU,
torch ops elsewhere). A completion row is forwarded only up to its own last credited position (rows of
similar reach share a forward), and each prompt is forwarded once for its whole group (its KV cache is
shared, with gradients flowing back through it), not G times.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
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
        checkpointed = getattr(base, "is_activation_checkpointing", None)
        if checkpointed is None:  # transformers < 5
            checkpointed = getattr(base, "is_gradient_checkpointing", False)
        shared = self.share_prompt and not checkpointed  # checkpointing needs one plain forward per row
        if self.truncate:  # completion tokens row r needs as inputs: 0 .. (its last credited position - 1)
            need = torch.zeros(len(comp_ids), dtype=torch.long, device=pos.device).scatter_reduce(0, rows, pos,
                                                                                                   "amax")
        else:
            need = torch.full((len(comp_ids),), comp_ids.shape[1], dtype=torch.long, device=pos.device)
        h_ctx, cache = (prefill(self.model, ctx_ids, ctx_mask, use_cache=bool(need.max() > 0)) if shared
                        else (None, None))
        parts, order = [], []
        for b_rows, width in width_buckets(need):
            cells = torch.isin(rows, b_rows).nonzero().squeeze(1)
            if not len(cells):
                continue
            h_last, h_comp = self._rows_forward(base, ctx_ids, ctx_mask, comp_ids[b_rows, :width],
                                                comp_mask[b_rows, :width], row_ctx[b_rows], h_ctx, cache)
            local = torch.searchsorted(b_rows, rows[cells])  # b_rows is sorted
            # hidden state that predicts completion token t: the context's last for t = 0, else completion t - 1
            h = h_last[local] if h_comp is None else torch.cat([h_last[:, None], h_comp], 1)[local, pos[cells]]
            parts.append(h)
            order.append(cells)
        hidden = torch.cat(parts)[torch.argsort(torch.cat(order))]
        return head_logp(base, hidden, comp_ids[rows, pos], self.vocab_tile, self.temperature)

    def _rows_forward(self, base, ctx_ids, ctx_mask, c_ids, c_mask, row_ctx, h_ctx, cache):
        """Hidden states of some completion rows: (at the context's last token [R, H], at the completion [R, W, H])."""
        width = c_ids.shape[1]
        if h_ctx is not None:  # the prompt was forwarded once; these rows attend to copies of its keys/values
            h_last = h_ctx[row_ctx, -1]
            if not width:
                return h_last, None
            rows_cache = DynamicCache([(layer.keys[row_ctx], layer.values[row_ctx]) for layer in cache.layers],
                                      config=base.config)
            mask = torch.cat([ctx_mask[row_ctx], c_mask], 1)
            position_ids = ctx_mask[row_ctx].sum(-1, keepdim=True) + torch.arange(width, device=c_ids.device)[None]
            h_comp = base.get_decoder()(input_ids=c_ids, attention_mask=mask, position_ids=position_ids,
                                        past_key_values=rows_cache, use_cache=True).last_hidden_state
            return h_last, h_comp
        ids = torch.cat([ctx_ids[row_ctx], c_ids], 1)
        mask = torch.cat([ctx_mask[row_ctx], c_mask], 1)
        h, _ = prefill(self.model, ids, mask, use_cache=False)
        p = ctx_ids.shape[1]
        return h[:, p - 1], (h[:, p:] if width else None)


def width_buckets(need: torch.Tensor, min_fill: float = 0.5) -> list[tuple[torch.Tensor, int]]:
    """Split rows into forwards by the completion width each needs: from the widest down, a row joins the current
    bucket while it needs at least `min_fill` of the bucket's width. Padding is then at most 1/min_fill of the
    work, and a row credited only near its start (T-SPMO's early branch points) is not forwarded to the batch's
    last credited column. Rows that need no completion tokens form one bucket of width 0. Returns (sorted row
    indices, width) pairs."""
    order = torch.argsort(need, descending=True, stable=True).tolist()
    values = need.tolist()
    buckets: list[list[int]] = []
    for r in order:
        w = values[buckets[-1][0]] if buckets else None
        if w is not None and (values[r] == w or (values[r] > 0 and values[r] >= min_fill * w)):
            buckets[-1].append(r)
        else:
            buckets.append([r])
    return [(torch.tensor(sorted(b), device=need.device), values[b[0]]) for b in buckets]


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
