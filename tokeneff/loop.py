"""The one training loop shared by GRPO, S-GRPO and T-SPMO.

Per step: pick prompts (the algorithm's group sampler may restart some from a partial answer) -> sample G
completions each (one batch) -> reward -> the algorithm's `select` gives (completion, position, advantage,
weight) credits -> log-probs at the credited positions only -> policy-gradient loss (+ beta * KL to the
adapter-free reference) -> one AdamW update of the LoRA weights. The loop knows no algorithm by name: it calls
`algorithms.ALGORITHMS[cfg.algo]` and `algorithms.group_sampler(cfg)`; the loss normalisation is
`algorithms.step_credits`'s. Checkpoint contents: checkpoint.py; the run directory's rules: rundir/.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS, GroupSampler, StepCredits, group_sampler, step_credits
from .checks import check_context, check_lora_targets, check_model_path, check_precision
from .config import TrainConfig, make_config
from .errors import TokeneffError
from .evaluate import evaluate_model
from .kernels import onednn_context
from .loss import SelectiveLogProbs, policy_loss
from .mechanisms import step_mechanisms
from .models import load_model
from .rollout import Rollout, build_prompt, decode, encode_prompts, sample
from .run import Run
from .tasks import Problem, Task, make_task
from .utils import memory_mb, seed_everything, set_threads
from .warmstart import model_folder

TIMING_KEYS = ("step_seconds", "rollout_seconds", "peak_memory_mb")  # metrics.jsonl keys that vary run to run


@dataclass
class Group:
    """One prompt's G completions; `prefix` is a partial answer they continue (picked by the algorithm's group
    sampler) or empty; `index` is the problem's position in the training split."""
    problem: Problem
    index: int
    prompt_ids: list[int]
    prefix: list[int]


@dataclass
class LoopState:
    """Everything the loop carries from step to step besides the weights and the optimiser. With those, a
    checkpoint of it continues the run bit-for-bit. One per data-parallel rank (each has its own data position,
    RNGs and group sampler); `step` and `evals` are the same on every rank."""
    order: list[int]
    """the training problems' seeded order"""
    data_pos: int
    select_rng: random.Random
    """the algorithm's draws (S-GRPO's token subsets)"""
    sampler: GroupSampler
    step: int = 0
    bad_in_row: int = 0
    """non-finite losses in a row (updates skipped)"""
    evals: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """This rank's part (`step` and `evals` go to the checkpoint's shared state.json)."""
        return dict(data_pos=self.data_pos, bad_in_row=self.bad_in_row, select_rng=self.select_rng.getstate(),
                    **self.sampler.state_dict(), python_rng=random.getstate(), torch_rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.step, self.evals, self.data_pos, self.bad_in_row = s["step"], s["evals"], s["data_pos"], s["bad_in_row"]
        self.select_rng.setstate(s["select_rng"])
        self.sampler.load_state_dict(s)  # it reads its own keys
        random.setstate(s["python_rng"])
        torch.set_rng_state(s["torch_rng"])
        if s["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda_rng"])


# ----------------------------------------------------------------------------------------------------------
# one step: (1) pick groups, sample and score -> credits; (2) loss on the credited tokens and backward
# ----------------------------------------------------------------------------------------------------------

def pick_groups(cfg: TrainConfig, problems: list[Problem], tok, task, state: LoopState) -> list[Group]:
    """prompts_per_step problems in the seeded order, unless the group sampler picks a (problem, prefix)."""
    groups = []
    for _ in range(cfg.prompts_per_step):
        picked = state.sampler.pick()
        if picked is None:
            index, prefix = state.order[state.data_pos % len(state.order)], []
            state.data_pos += 1
        else:
            index, prefix = picked
        prompt = encode_prompts(tok, [build_prompt(tok, task.messages(problems[index]))])[0]
        groups.append(Group(problems[index], index, prompt, prefix))
    return groups


def sample_and_score(cfg: TrainConfig, policy, tok, task, groups: list[Group],
                     state: LoopState) -> tuple[Rollout, list[float], StepCredits, float]:
    """G completions per group in one batch, their rewards (on prefix + completion) and the algorithm's credits;
    the group sampler sees every scored group. Also returns the sampling's wall time."""
    G = cfg.group_size
    t0 = time.perf_counter()
    roll = sample(policy, tok, [g.prompt_ids + g.prefix for g in groups], G, cfg.max_new_tokens,
                  cfg.temperature, cfg.top_p, **cfg.rollout_options())
    rollout_s = time.perf_counter() - t0
    texts = [decode(tok, groups[j // G].prefix + c) for j, c in enumerate(roll.completions)]
    rewards = task.reward(prompts=[None] * len(texts), completions=texts,
                          answer=[groups[j // G].problem.answer for j in range(len(texts))])
    credits = step_credits(ALGORITHMS[cfg.algo], roll.completions, rewards, G, cfg, state.select_rng)
    for gi, g in enumerate(groups):
        state.sampler.record(g.index, g.prefix, roll.completions[gi * G: (gi + 1) * G], rewards[gi * G: (gi + 1) * G])
    return roll, rewards, credits, rollout_s


NO_CREDIT = StepCredits(rows=[0], cols=[0], adv=[0.0], weight=[0.0])
"""What a rank with no credited token backpropagates: one zero-weight token, so data-parallel ranks stay in step."""


def backward(cfg: TrainConfig, accel, policy_lp, roll: Rollout, credits: StepCredits) -> tuple[float, float]:
    """Log-probs at the credited positions only (and the reference's, for the KL), the policy-gradient loss and
    backward, micro-batched over groups; gradients accumulate. Returns (loss, kl) summed over micro-batches."""
    G, device = cfg.group_size, accel.device
    c = credits if len(credits) else NO_CREDIT
    lp = accel.unwrap_model(policy_lp)
    per_mb = max(1, cfg.micro_batch_size // G)
    credited = sorted({r // G for r in c.rows})
    batches = [credited[i: i + per_mb] for i in range(0, len(credited), per_mb)]
    loss_total, kl_total = 0.0, 0.0
    for bi, gids in enumerate(batches):
        idx = [j for j, r in enumerate(c.rows) if r // G in gids]
        comp_rows = sorted({c.rows[j] for j in idx})
        local_row = {r: k for k, r in enumerate(comp_rows)}
        local_ctx = {g: k for k, g in enumerate(gids)}
        batch = dict(ctx_ids=roll.context_ids[gids].to(device), ctx_mask=roll.context_mask[gids].to(device),
                     comp_ids=roll.completion_ids[comp_rows].to(device),
                     comp_mask=roll.completion_mask[comp_rows].to(device),
                     row_ctx=torch.tensor([local_ctx[r // G] for r in comp_rows], device=device),
                     rows=torch.tensor([local_row[c.rows[j]] for j in idx], device=device),
                     pos=torch.tensor([c.cols[j] for j in idx], device=device))
        adv = torch.tensor([c.adv[j] for j in idx], device=device)
        weight = torch.tensor([c.weight[j] for j in idx], device=device)
        # oneDNN's products (train_gemm) over the backward too: activation checkpointing recomputes the forward
        # there, and must meet the layers the forward ran through
        with onednn_context(lp, "train_gemm", cfg.train_gemm, True, backward=True):
            with accel.autocast():
                logp = policy_lp(**batch)
                ref = None
                if cfg.beta > 0 or cfg.log_kl:
                    with torch.no_grad(), lp.model.disable_adapter():
                        ref = lp(**batch)
                loss, kl = policy_loss(logp, adv, weight, ref, cfg.beta)
            with accel.no_sync(policy_lp) if bi < len(batches) - 1 else contextlib.nullcontext():
                accel.backward(loss)
        loss_total += float(loss.detach())
        kl_total += float(kl)
    return loss_total, kl_total


def reduce_sums(accel, sums: dict[str, float]) -> dict[str, float]:
    """Each named count summed over data-parallel ranks (one all-reduce; keys in a fixed order on every rank)."""
    keys = sorted(sums)
    t = accel.reduce(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=accel.device), "sum")
    return dict(zip(keys, t.tolist(), strict=True))


# ----------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------

def train(config: TrainConfig | None = None, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, custom_task: Task | None = None, **overrides) -> dict[str, Any]:
    """Train a LoRA adapter with `config.algo`; returns the final summary (also written to final.json).

    resume: continue the run in `config.out` from its newest complete checkpoint (a finished run returns its
    final.json at once; a new or empty folder starts at step 0). overwrite: delete the run in `config.out` first
    (only a tokeneff run directory holding nothing else; see rundir/). custom_task: a `Task` to train and
    evaluate on instead of `tasks.make_task(config)` (one with another reward, say).
    """
    from accelerate import Accelerator

    if config is None:
        config = make_config(overrides.pop("profile", "embedded"), overrides=overrides)
    elif overrides:
        config = make_config(config.profile, overrides={**config.to_dict(), **overrides})
    cfg = config.validate()
    check_precision(cfg.mixed_precision)
    accel = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if accel.device.type == "cpu":
        set_threads(cfg.threads)
    run = Run(cfg, accel, resume, overwrite, progress)
    final = run.finished()
    if final is not None:
        return final
    check_model_path(model_folder(cfg.model))  # a warm start must be built (never here), a local folder whole
    with run:
        return _train(cfg, accel, run, custom_task or make_task(cfg), progress)


def _train(cfg: TrainConfig, accel, run: Run, task: Task, progress: bool) -> dict[str, Any]:
    """The loop: load, then `train_step` after `train_step`, evaluating, logging and saving on the way."""
    from peft import get_peft_model

    main, rank, world = accel.is_main_process, accel.process_index, accel.num_processes
    train_problems, test_problems = _problems(task, cfg)
    model, tok = load_model(model_folder(cfg.model), dtype=_dtype(cfg))
    check_lora_targets(model, cfg.lora_target_list(), cfg.model, cfg.lora_r)
    check_context(model, tok, task, train_problems + test_problems, cfg)
    # Seeded after loading: a first load converts the model (random init from_config) and would consume the RNG,
    # so a cold cache (or an earlier job in the same worker) would change the LoRA init and every sample.
    seed_everything(cfg.seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    run.prepare()
    policy = get_peft_model(model, cfg.peft_config())
    policy_lp = SelectiveLogProbs(policy, cfg.lm_head_tile, temperature=cfg.temperature)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    policy_lp, optimizer = accel.prepare(policy_lp, optimizer)
    policy = accel.unwrap_model(policy_lp).model
    order = list(range(len(train_problems)))
    random.Random(cfg.seed).shuffle(order)
    state = LoopState(order, data_pos=rank * cfg.prompts_per_step, select_rng=random.Random(cfg.seed + 1),
                      sampler=group_sampler(cfg))
    saved = run.restore(policy, optimizer)
    if saved:
        state.load_state_dict(saved)

    def evaluate_now() -> float:
        t = time.perf_counter()
        res = evaluate_model(policy, tok, task, test_problems, cfg.eval_batch_size,
                             cfg.eval_max_new_tokens or cfg.max_new_tokens, progress and main,
                             **cfg.rollout_options(evaluation=True))
        state.evals.append(dict(step=state.step, accuracy=res["accuracy"], n=res["n"],
                                seconds=time.perf_counter() - t))
        run.record_eval(state.step, res)
        return res["accuracy"]

    if state.step == 0 and not state.evals and cfg.eval_at_start:
        run.log(dict(step=0, eval_accuracy=evaluate_now()))
    policy_lp.train()
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"{cfg.algo} {cfg.task}", disable=not (progress and main))
    with run.training(lambda: state.step), StopAfterStep(enabled=world == 1) as stop, bar:
        while state.step < cfg.steps:
            row = train_step(cfg, accel, policy, policy_lp, optimizer, params, tok, task, train_problems, state)
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == cfg.steps:
                row["eval_accuracy"] = evaluate_now()
            run.log(row)
            bar.update()
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}", tok=f"{row['frac_tokens_in_loss']:.0%}")
            stopping = stop.requested  # read once: a signal arriving now waits for the next step
            if state.step % cfg.save_every == 0 or state.step == cfg.steps or stopping:
                run.save(policy, optimizer, state.step, state.evals, state.state_dict())
            if stopping and state.step < cfg.steps:
                tqdm.write(f"stopped after step {state.step}")
                raise Stopped(stopping)
    # Data-parallel ranks must end with the same adapter: record a checksum per rank.
    checksum = torch.stack([p.detach().double().abs().sum() for p in params]).sum().reshape(1).to(accel.device)
    evals = state.evals
    final = dict(rank_adapter_checksums=accel.gather(checksum).tolist(),
                 steps_done=state.step, algo=cfg.algo, task=cfg.task, model=cfg.model, profile=cfg.profile,
                 seed=cfg.seed, evals=evals, base_accuracy=evals[0]["accuracy"] if evals else None,
                 final_accuracy=evals[-1]["accuracy"] if evals else None)
    run.finish(policy, final)
    return final


def _problems(task: Task, cfg: TrainConfig) -> tuple[list[Problem], list[Problem]]:
    """The training problems and the evaluation's (the first eval_limit of its split)."""
    train_problems, test_problems = task.problems("train"), task.problems(cfg.eval_split)
    for split, probs in (("train", train_problems), (cfg.eval_split, test_problems)):
        if not probs:
            raise TokeneffError(f"task {cfg.task!r}: its {split} split is empty")
    return train_problems, test_problems[: cfg.eval_limit] if cfg.eval_limit else test_problems


def _dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.mixed_precision == "bf16" and torch.cuda.is_available() else torch.float32


def train_step(cfg: TrainConfig, accel, policy, policy_lp, optimizer, params, tok, task, problems: list[Problem],
               state: LoopState) -> dict[str, Any]:
    """One policy update: pick groups, sample and score, backward on the credited tokens, one AdamW step (skipped
    when the loss or gradient is not finite). Returns the step's metrics row."""
    t0 = time.perf_counter()
    groups = pick_groups(cfg, problems, tok, task, state)
    roll, rewards, credits, rollout_s = sample_and_score(cfg, policy, tok, task, groups, state)
    loss, kl = backward(cfg, accel, policy_lp, roll, credits)
    grad_norm = accel.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
    finite = math.isfinite(loss) and (grad_norm is None or torch.isfinite(grad_norm).item())
    if finite:
        optimizer.step()
        if not all(torch.isfinite(p).all() for p in params):  # what would reach the sampler next
            raise TokeneffError(f"step {state.step + 1}: the update made LoRA weights non-finite (lr={cfg.lr:g}, "
                                f"weight_decay={cfg.weight_decay:g}: too large?): stopping")
    optimizer.zero_grad(set_to_none=True)
    state.bad_in_row = 0 if finite else state.bad_in_row + 1
    state.data_pos += (accel.num_processes - 1) * cfg.prompts_per_step  # ranks take interleaved prompts
    state.step += 1
    row = step_metrics(cfg, accel, state, groups, roll, rewards, credits, loss, kl, grad_norm, finite, rollout_s)
    if not finite:
        tqdm.write(f"step {state.step}: non-finite loss, update skipped ({state.bad_in_row} in a row)")
        if state.bad_in_row >= cfg.max_bad_steps:
            raise TokeneffError(f"{state.bad_in_row} non-finite losses in a row: stopping (lower lr?)")
    row["step_seconds"] = time.perf_counter() - t0
    row["peak_memory_mb"] = memory_mb(peak=True, device=accel.device)
    return row


def step_metrics(cfg: TrainConfig, accel, state: LoopState, groups: list[Group], roll: Rollout,
                 rewards: list[float], credits: StepCredits, loss: float, kl: float, grad_norm, finite: bool,
                 rollout_seconds: float) -> dict[str, Any]:
    """The step's row of metrics.jsonl: counts summed over data-parallel ranks by name, rewards gathered."""
    world = accel.num_processes
    n_tokens = sum(len(x) for x in roll.completions)
    s = reduce_sums(accel, dict(zero_std=credits.zero_std_groups, groups=len(groups), loss=loss, kl=kl,
                                tokens_in_loss=len(credits), tokens_total=n_tokens,
                                tokens_in_signal_groups=credits.signal_tokens))
    reward = accel.gather(torch.tensor(rewards, device=accel.device))
    return dict(step=state.step, reward_mean=float(reward.mean()), reward_std=float(reward.std()),
                frac_groups_zero_std=s["zero_std"] / s["groups"], loss=s["loss"] / world, kl=s["kl"] / world,
                tokens_in_loss=int(s["tokens_in_loss"]), tokens_total=int(s["tokens_total"]),
                frac_tokens_in_loss=s["tokens_in_loss"] / max(s["tokens_total"], 1),
                tokens_in_signal_groups=int(s["tokens_in_signal_groups"]),
                completion_len_mean=n_tokens / len(roll.completions),
                clipped_ratio=sum(roll.truncated) / len(roll.truncated),
                grad_norm=float(grad_norm) if grad_norm is not None else None, skipped=not finite,
                **state.sampler.metrics(), rollout_seconds=rollout_seconds,
                **step_mechanisms([len(g.prefix) for g in groups], rewards, credits, cfg.group_size,
                                  cfg.max_new_tokens))


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
"""Ctrl-C, a polite kill, a closed terminal (or ssh session): each stops a run the same way"""


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal (`signum`, one of STOP_SIGNALS)."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


class StopAfterStep:
    """Ctrl-C (or SIGTERM, SIGHUP) during training finishes the current step, checkpoints it and stops, so that a resume
    continues exactly as if never interrupted; a second one stops at once (the last checkpoint stands, as after a
    kill). Only for one process in its main thread: data-parallel ranks could not agree on the step to stop at,
    so there the first signal stops at once."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: int | bool = False
        """False, or the signal that asked to stop"""
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise Stopped(signum)
        self.requested = signum  # no printing here: the handler may run in the middle of the main thread's print

    def __enter__(self) -> StopAfterStep:
        if self.enabled:
            for sig in STOP_SIGNALS:
                old = signal.getsignal(sig)
                if old is not None and old is not signal.SIG_IGN:  # ignored on purpose (a grid's worker): stays so
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def install_sigterm_handler() -> None:
    """Turn SIGTERM and SIGHUP into a KeyboardInterrupt (`Stopped`, which remembers the signal for the exit code) so
    that a polite kill or a closed terminal also checkpoints and cleans up. SIGINT is reset to Python's handler too:
    a process started in the background by a shell inherits SIGINT ignored."""
    for sig in STOP_SIGNALS[1:]:
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(sig, lambda signum, _: (_ for _ in ()).throw(Stopped(signum)))
    signal.signal(signal.SIGINT, signal.default_int_handler)
