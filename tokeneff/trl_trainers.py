"""S-GRPO and T-SPMO as TRL trainers: `SGRPOTrainer` and `TSPMOTrainer`, subclasses of `trl.GRPOTrainer`.

    from trl import GRPOConfig
    from tokeneff.trl_trainers import SGRPOTrainer
    trainer = SGRPOTrainer(model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=data,
                           peft_config=LoraConfig(...), sgrpo_alpha=25, sgrpo_p=0.5, sgrpo_k=100)
    trainer.train()

Everything else is TRL's: generation (transformers or vLLM), reward functions, data-parallel `accelerate launch`
(DeepSpeed, FSDP), LoRA through `peft_config`, logging, checkpoints. What changes is which completion tokens carry
loss and with what weight; the selection is `tokeneff.algorithms` (`sgrpo.select`, `tspmo.select`), the same code
our own loop (`tokeneff.train`) runs, so there is one implementation of each algorithm in the repository.

How it plugs into TRL 1.16 (the overridden private methods are pinned: `TRL_SIGNATURES`, checked at construction
and in tests/test_trl_trainers.py):
- `_calculate_rewards` is wrapped to keep the summed rewards of the generation batch (all processes) and this
  process's completion token ids; `_generate_and_score_completions` then gathers every process's completions, runs
  the algorithm's `select` on each group of `num_generations` completions (on every process, with the same seeded
  `random.Random`, so processes agree), and replaces TRL's per-completion advantages by
    advantages (B, T) = A at each credited (completion, position), 0 elsewhere
    tool_mask  (B, T) = our per-token weight w there (times TRL's own tool mask, if any), 0 elsewhere
  TRL multiplies `tool_mask` into the completion mask for the loss only: the completion mask, which is also the
  attention mask, is left as it is.
- Normalisation. Ours (`tokeneff.algorithms.base`, `tokeneff.train`): L = (1/S) sum over credited cells j of
  w_j * (-A_j * ratio_j + beta * KL_j), where S is the number of groups that carry signal (at least one credited
  token) and w_j = 1 / (G |T_i|) for S-GRPO (T_i: completion i's kept positions), 1 / #distinct edges of the
  group for T-SPMO. TRL's `loss_type="dapo"` (its default) computes sum(per_token_loss * mask) /
  (num_items_in_batch / num_processes * gradient_accumulation_steps / steps_per_generation). With the weights in
  the mask and `num_items_in_batch = S` (counted over the whole generation batch, all processes), the gradient of
  one optimiser step (its micro-batches summed, processes averaged; steps_per_generation = gradient accumulation,
  TRL's default) is exactly ours, the KL term included when `use_bias_correction_kl=False` (TRL's default, True,
  multiplies the KL by the differentiable ratio: TRL's unbiased reverse-KL gradient, not our k3 term). With
  steps_per_generation = m * gradient_accumulation_steps, each of the m optimiser steps takes its share of the
  generation batch scaled by m, as TRL's dapo does. Every other `loss_type` normalises per completion
  (grpo, sapo, luspo) or by a constant (dr_grpo) or changes the objective (cispo, vespo), so the trainers refuse it.
  The weights are not put into the advantages because beta * KL would then go unweighted.
  Relation to plain `GRPOTrainer(loss_type="grpo")`: with every token kept (sgrpo_alpha >= max_completion_length)
  and every group carrying signal, S-GRPO's 1/(G |y_i|) per token is GRPO's mean over a completion's tokens and then
  over the batch, so the two trainers take the same step (tested). Groups whose rewards are all equal differ: TRL
  counts them in its batch mean (with advantage 0), we leave them out of S, as our own loop does.
- Rewards: TRL's sum of weighted reward functions (`multi_objective_aggregation="sum_then_normalize"`);
  S-GRPO's advantage is (r - mean) / (std + adv_eps) over the group (sample std, as TRL's `scale_rewards="group"`),
  T-SPMO's is Q(p, v) - V(p) with no std. A completion for which every reward function returned None is left out
  of its group (TRL leaves it out of its baseline too).

Memory and compute: what is and is not saved inside TRL's structure.
- Saved: each micro-batch is cut after its last credited column before the loss forward (attention is causal, so
  the log-probabilities of earlier positions are unchanged): nothing past the micro-batch's last credited token
  goes through the model. The fused LM head (TRL's `add_fused_lm_head`) is given labels at the credited positions
  only; on CUDA (Triton) it then projects only those positions, as our own loop does. On a CPU, TRL's head scores
  every position anyway (it keeps tile shapes fixed off Triton), so there the head runs at every position up to the
  cut.
- Not possible without replacing TRL's loop: the cut is per micro-batch, not per row (a micro-batch's rows share
  one padded width; ours forwards each row only up to its own last credited token); each [prompt | completion] row
  is forwarded on its own, so a prompt goes through the model G times per step in the loss (ours: once per group,
  its KV cache shared); the forwards TRL runs inside `_generate_and_score_completions` before any credit exists
  (the reference model when beta > 0, old log-probs when num_iterations > 1 or with vLLM's importance-sampling
  correction) cover every completion position; rollouts are TRL's (`generate` or vLLM).

Supported TRL features: LoRA through `peft_config`; gradient accumulation (the step is the same as without it,
tested); `num_iterations > 1` (TRL's clipped-ratio reuse of a batch; the first iteration is our on-policy step,
later ones are TRL's PPO-style extension, not in the paper); data-parallel `accelerate launch` (tested with two CPU
processes, gloo); `use_vllm=True` (generation only changes; the importance-sampling correction multiplies the
per-token loss as in TRL; not tested here, no GPU with vLLM); `mask_truncated_completions` (such rows carry no
loss; S-GRPO's G still counts them); `beta > 0`.
Not supported: T-SPMO's replay-based resampling (restarting groups from cut successful completions needs prompts
that end inside an answer; TRL's sampler draws dataset rows, and a `rollout_func` doing it would bypass TRL's
generation; use `tokeneff train` for it); `loss_type` other than "dapo"; `importance_sampling_level="sequence"`;
`top_entropy_quantile < 1` (TRL's own token masking); `multi_objective_aggregation="normalize_then_sum"`; for
S-GRPO `scale_rewards` other than "group". Each of these raises `ConfigError` naming the value. Untested: tools,
environments, vision-language models (the cut and the credited-label head are then skipped), and third-party
patches of `GRPOTrainer` (e.g. Unsloth's), which replace the methods overridden here. After `resume_from_checkpoint`,
S-GRPO's selection stream restarts from its seed.
"""

from __future__ import annotations

import inspect
import math
import random
from typing import Any

import torch
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer

from .algorithms import ALGORITHMS
from .config import FIELD_NAMES, MAX_LR, TrainConfig
from .errors import ConfigError, TokeneffError, show

TRL_TESTED = ">=1.16,<1.17"
"""the TRL versions these subclasses are tested against (pyproject.toml pins the same range)"""

# inspect.signature of the TRL methods overridden or relied on, as in TRL 1.16.0
TRL_SIGNATURES = {
    "_generate_and_score_completions": "(self, inputs: list[dict[str, torch.Tensor | typing.Any]]) -> "
                                       "dict[str, torch.Tensor | typing.Any]",
    "_calculate_rewards": "(self, inputs, prompts, completions, completion_ids_list)",
    "_compute_loss": "(self, model, inputs)",
    "_get_per_token_logps_and_entropies": "(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, "
                                          "compute_entropy=False, compute_aux_loss=False, pixel_values=None, "
                                          "image_grid_thw=None, num_images=None, pixel_attention_mask=None, "
                                          "spatial_shapes=None, num_tiles=None, image_sizes=None, "
                                          "token_type_ids=None, mm_token_type_ids=None, image_position_ids=None) -> "
                                          "tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]",
}

# (B, T) tensors of a generation batch, cut with the completion columns; others with a completion axis stop the cut
_PER_TOKEN_KEYS = ("completion_ids", "completion_mask", "tool_mask", "advantages", "old_per_token_logps",
                   "ref_per_token_logps", "sampling_per_token_logps", "importance_sampling_ratio")
_TEXT_ONLY_KEYS = ("prompt_ids", "prompt_mask", "num_items_in_batch")


def trl_signature_changes() -> list[str]:
    """Names of the overridden GRPOTrainer methods whose signature differs from the one these subclasses were
    written against (empty when TRL matches)."""
    return [name for name, sig in TRL_SIGNATURES.items()
            if str(inspect.signature(getattr(GRPOTrainer, name))) != sig]


def credit_tensors(completions: list[list[int]], rewards: list[float], group_size: int, algo: str, cfg: TrainConfig,
                   rng: random.Random, rows: range, width: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Run `algo`'s selection on every group of a generation batch and lay this process's rows out as tensors.

    completions / rewards: the whole batch in TRL's global order (groups of `group_size` consecutive rows);
    `rows`: the global indices of this process's rows. Returns (advantages [len(rows), width], weights [len(rows),
    width], S = groups with at least one credited token, credited cells in the whole batch). NaN rewards
    (unscorable completions) leave their completion out of its group.
    """
    select = ALGORITHMS[algo]
    adv = torch.zeros(len(rows), width)
    weight = torch.zeros(len(rows), width)
    signal, cells = 0, 0
    for g in range(len(completions) // group_size):
        idx = [g * group_size + i for i in range(group_size) if math.isfinite(rewards[g * group_size + i])]
        if len(idx) < 2:
            continue
        credits = select([completions[j] for j in idx], [rewards[j] for j in idx], cfg, rng)
        if not len(credits):
            continue
        signal += 1
        cells += len(credits)
        for i, t, a, w in zip(credits.seq, credits.pos, credits.adv, credits.weight, strict=True):
            row = idx[i]
            if row in rows:
                adv[row - rows.start, t] = a
                weight[row - rows.start, t] = w
    return adv, weight, signal, cells


class _SelectiveGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss sits on the (completion, position) cells a tokeneff algorithm credits."""

    algo: str = ""

    def __init__(self, *args, _tokeneff: dict[str, Any], **kwargs):
        changed = trl_signature_changes()
        if changed:
            import trl

            raise TokeneffError(f"trl {trl.__version__}: GRPOTrainer.{changed[0]} changed signature; "
                                f"{type(self).__name__} is tested with trl{TRL_TESTED}")
        name = next((c.__name__ for c in type(self).__mro__  # ours, not a user's subclass
                     if c.__module__ == __name__ and not c.__name__.startswith("_")), type(self).__name__)
        for k in kwargs:  # a tokeneff setting this trainer does not take (T-SPMO's replay=, say): one line
            if k in FIELD_NAMES and k not in inspect.signature(GRPOTrainer.__init__).parameters:
                why = ("T-SPMO's replay-based resampling is not supported in TRL (see tokeneff.trl_trainers); use "
                       "`tokeneff train --algo tspmo`" if k.startswith("replay") else "set it in GRPOConfig or use "
                       "`tokeneff train`")
                raise ConfigError(f"{k}={show(kwargs[k])}: not a parameter of {name}: {why}")
        for k, v in _tokeneff.items():  # the types TrainConfig's checks assume
            default = getattr(TrainConfig, k)
            ok = (isinstance(v, (int, float)) if isinstance(default, float) else isinstance(v, type(default)))
            if isinstance(v, bool) or not ok:
                kind = "a number" if isinstance(default, float) else "an integer"
                raise ConfigError(f"{k}={show(v)}: {name} needs {kind}, got {type(v).__name__}")
        self._algo_cfg = TrainConfig(algo=self.algo, **_tokeneff).validate()
        grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        self._check_args(grpo_args if grpo_args is not None else GRPOConfig(output_dir="unused"))
        super().__init__(*args, **kwargs)
        seed = self.args.seed
        self._select_rng = {"train": random.Random(seed + 1), "eval": random.Random(seed + 2)}
        self._batch_stash: dict[str, Any] = {}
        self._credited_cells: torch.Tensor | None = None

    def _check_args(self, args: GRPOConfig) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}={show(getattr(args, name))}: {type(self).__name__} {why}")

        # the rules `tokeneff train` enforces (TrainConfig.validate) for the settings both have
        if not (math.isfinite(args.learning_rate) and 0 <= args.learning_rate <= MAX_LR):
            raise bad("learning_rate", f"needs a learning rate in [0, {MAX_LR:g}]")
        for name in ("beta", "weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
                raise bad(name, "needs a non-negative number")
        if args.learning_rate * args.weight_decay >= 1:  # AdamW scales the weights by 1 - lr * weight_decay
            raise bad("weight_decay", f"needs learning_rate * weight_decay below 1 "
                                      f"(learning_rate={args.learning_rate:g})")

        if args.loss_type != "dapo":
            raise bad("loss_type", "needs 'dapo' (the default): its normalisation, with our per-token weights, is ours")
        if args.importance_sampling_level != "token":
            raise bad("importance_sampling_level", "credits single tokens: use 'token'")
        if args.top_entropy_quantile != 1.0:
            raise bad("top_entropy_quantile", "selects tokens itself: leave it at 1.0")
        if args.multi_objective_aggregation != "sum_then_normalize":
            raise bad("multi_objective_aggregation", "takes the weighted sum of rewards: use 'sum_then_normalize'")

    # --- credits -------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._batch_stash = dict(rewards_per_func=rewards_per_func,
                                 completion_ids=[[int(t) for t in ids] for ids in completion_ids_list])
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        stash, self._batch_stash = self._batch_stash, {}
        per_func = stash["rewards_per_func"]
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan
        local = stash["completion_ids"]
        everyone = gather_object(local) if self.accelerator.num_processes > 1 else local
        start = self.accelerator.process_index * len(local)
        G = self.num_generations if mode == "train" else self.num_generations_eval
        comp_mask = out["completion_mask"]
        adv, weight, signal, cells = credit_tensors(everyone, rewards.tolist(), G, self.algo, self._algo_cfg,
                                                    self._select_rng[mode], range(start, start + len(local)),
                                                    comp_mask.size(1))
        device = comp_mask.device
        weight = weight.to(device)
        if "tool_mask" in out:
            weight = weight * out["tool_mask"]
        out["advantages"] = adv.to(device)
        out["tool_mask"] = weight
        out["num_items_in_batch"] = torch.tensor(float(signal), device=device)
        self._metrics[mode]["tokeneff/frac_tokens_in_loss"].append(cells / max(sum(len(c) for c in everyone), 1))
        self._metrics[mode]["tokeneff/groups_with_signal"].append(float(signal))
        self._last_credits = dict(advantages=out["advantages"], weights=weight, signal_groups=signal, cells=cells,
                                  completions=local, rows=range(start, start + len(local)), rewards=rewards)
        return out

    # --- loss: cut after the last credited column, head at credited positions only --------------------------------

    def _compute_loss(self, model, inputs):
        text_only = all(k in _PER_TOKEN_KEYS + _TEXT_ONLY_KEYS for k in inputs)
        weight = inputs["completion_mask"] * inputs["tool_mask"]
        credited = weight != 0
        if text_only:
            width = int(credited.any(0).nonzero().max()) + 1 if credited.any() else 1
            T = inputs["completion_ids"].size(1)
            inputs = {k: (v[:, :width] if k in _PER_TOKEN_KEYS and torch.is_tensor(v) and v.dim() == 2
                          and v.size(1) == T else v) for k, v in inputs.items()}
            self._credited_cells = credited[:, :width]
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["tokeneff/frac_columns_forwarded"].append(width / T)
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._credited_cells = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        cells = self._credited_cells
        if cells is None or any(v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, compute_aux_loss,
                                                              **multimodal)
        # TRL's text-only path, with labels (the positions the fused head scores) at the credited cells only
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            labels = torch.full_like(ids, -100)
            labels[:, -logits_to_keep:] = ids[:, -logits_to_keep:].masked_fill(~cells[start:start + batch_size],
                                                                               -100)
            extra = {"output_router_logits": True} if compute_aux_loss else {}
            with self.accelerator.autocast():
                outputs = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **extra)
            logps.append(outputs.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(outputs.entropy[:, -logits_to_keep:])
            if compute_aux_loss:
                aux.append(outputs.aux_loss)
        return (torch.cat(logps), torch.cat(entropies) if compute_entropy else None,
                torch.stack(aux).mean() if compute_aux_loss else None)


class SGRPOTrainer(_SelectiveGRPOTrainer):
    """S-GRPO in TRL: the first `sgrpo_alpha` completion tokens, then each later one with probability `sgrpo_p`,
    at most `sgrpo_k` per completion, carry loss; advantage (r - mean) / (std + adv_eps) per group; weight
    1 / (G |T_i|). Other arguments: `trl.GRPOTrainer`'s. Defaults and validation: `tokeneff.config.TrainConfig`."""

    algo = "sgrpo"

    def __init__(self, *args, sgrpo_alpha: int = TrainConfig.sgrpo_alpha, sgrpo_p: float = TrainConfig.sgrpo_p,
                 sgrpo_k: int = TrainConfig.sgrpo_k, adv_eps: float = TrainConfig.adv_eps, **kwargs):
        super().__init__(*args, _tokeneff=dict(sgrpo_alpha=sgrpo_alpha, sgrpo_p=sgrpo_p, sgrpo_k=sgrpo_k,
                                               adv_eps=adv_eps), **kwargs)

    def _check_args(self, args: GRPOConfig) -> None:
        super()._check_args(args)
        if args.scale_rewards != "group":
            raise ConfigError(f"scale_rewards={args.scale_rewards!r}: SGRPOTrainer's advantage is scaled by the "
                              "group's std: use 'group'")


class TSPMOTrainer(_SelectiveGRPOTrainer):
    """T-SPMO in TRL: each distinct (prefix, next token) edge of a group's prefix tree where the group branches
    carries loss once, with advantage Q(p, v) - V(p) (no std scaling, so `scale_rewards` is not used) and weight
    1 / #edges. No replay-based resampling (see the module docstring). Other arguments: `trl.GRPOTrainer`'s."""

    algo = "tspmo"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, _tokeneff={}, **kwargs)
