"""The one training loop shared by GRPO, S-GRPO and T-SPMO.

Per step: pick prompts -> sample G completions each (one batch) -> reward -> the algorithm's `select`
gives (completion, position, advantage, weight) credits -> log-probs at the credited positions only ->
policy-gradient loss (+ beta * KL to the adapter-free reference) -> one AdamW update of the LoRA weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS, Credits
from .algorithms.tspmo import last_branch_points
from .config import TokeneffError, TrainConfig, make_config
from .evaluate import evaluate_model
from .loss import SelectiveLogProbs, policy_loss
from .rollout import build_prompt, decode, encode_prompts, sample
from .tasks import Problem, make_task
from .utils import atomic_write_bytes, peak_memory_mb, seed_everything, set_threads, write_json

TIMING_KEYS = ("step_seconds", "rollout_seconds", "peak_memory_mb", "eval_seconds")


@dataclass
class Group:
    """One prompt's G completions; `prefix` is a replayed partial answer (T-SPMO) or empty."""
    problem: Problem
    prompt_ids: list[int]
    prefix: list[int]


# ----------------------------------------------------------------------------------------------------------
# plumbing: setup, checkpoints
# ----------------------------------------------------------------------------------------------------------

def _prepare_out_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TokeneffError(f"out={cfg.out!r} exists and is not a directory")
    holds_run = out.is_dir() and any((out / n).exists() for n in ("metrics.jsonl", "config.json", "checkpoint"))
    if holds_run and not (resume or overwrite):
        raise TokeneffError(f"out={cfg.out!r} already holds a run: pass --resume to continue it or "
                            "--overwrite to replace it")
    if holds_run and resume:
        old = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
        differ = [k for k, v in cfg.to_dict().items() if k not in ("steps", "out") and old.get(k, v) != v]
        if differ:
            k = differ[0]
            raise TokeneffError(f"out={cfg.out!r} holds a different run ({k}={old[k]!r}, not {getattr(cfg, k)!r}): "
                                "use another --out or --overwrite")
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _save_checkpoint(out: Path, policy, optimizer, state: dict[str, Any]) -> None:
    """adapter + optimiser + RNG + loop state, written to a temp folder and swapped in by rename."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp / "adapter")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    np_state = np.random.get_state()
    state = dict(state, numpy_rng=[np_state[0], np_state[1].tolist(), *np_state[2:]])
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out: Path, policy, optimizer) -> dict[str, Any] | None:
    ck = out / "checkpoint"
    if not (ck / "state.json").is_file() and (out / "checkpoint.old" / "state.json").is_file():
        ck = out / "checkpoint.old"  # killed between the two renames
    if not (ck / "state.json").is_file():
        return None
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(policy, load_file(ck / "adapter" / "adapter_model.safetensors"))
    optimizer.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True))
    rng = torch.load(ck / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((ck / "state.json").read_text())
    s = state.pop("numpy_rng")
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))
    return state


def _rng_state_to_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _rng_state_from_json(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


class MetricsLog:
    """metrics.jsonl, one JSON object per step; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, keep_below_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) < keep_below_step]
            atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode())

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()


# ----------------------------------------------------------------------------------------------------------
# the algorithm: one step
# ----------------------------------------------------------------------------------------------------------

def _pick_groups(cfg, problems, order, data_pos, tok, task, replay_buf, rng) -> tuple[list[Group], int]:
    """prompts_per_step problems in a seeded order; with T-SPMO replay, some restart from a cut success."""
    groups = []
    for _ in range(cfg.prompts_per_step):
        if cfg.use_replay and replay_buf and rng.random() < cfg.replay_fraction:
            # Replay-based resampling: a successful completion, cut past its last trained branch point.
            pid, tokens, last_branch = replay_buf[rng.randrange(len(replay_buf))]
            problem = problems[pid]
            lo = min(last_branch + 1, len(tokens) - 1)
            cut = rng.randint(lo, len(tokens) - 1)
            prefix = tokens[:cut]
        else:
            problem = problems[order[data_pos % len(order)]]
            data_pos += 1
            prefix = []
        prompt = encode_prompts(tok, [build_prompt(tok, task.messages(problem))])[0]
        groups.append(Group(problem, prompt, prefix))
    return groups, data_pos


def _train_step(cfg, accel, policy_lp, tok, task, groups, select_rng, problem_index) -> dict[str, Any]:
    """Rollout, credit assignment and one optimiser update; returns the step's metrics."""
    policy = accel.unwrap_model(policy_lp).model
    G = cfg.group_size
    t0 = time.perf_counter()
    roll = sample(policy, tok, [g.prompt_ids + g.prefix for g in groups], G, cfg.max_new_tokens,
                  cfg.temperature, cfg.top_p, backend=cfg.rollout_backend)
    rollout_s = time.perf_counter() - t0
    texts = [decode(tok, groups[j // G].prefix + c) for j, c in enumerate(roll.completions)]
    answers = [groups[j // G].problem.answer for j in range(len(texts))]
    rewards = task.reward(prompts=[None] * len(texts), completions=texts, answer=answers)

    # --- credit assignment: the only place the algorithms differ ---
    select = ALGORITHMS[cfg.algo]
    rows, cols, adv, weight = [], [], [], []
    zero_std, signal_groups, signal_tokens, successes = 0, 0, 0, []
    for gi in range(len(groups)):
        sl = slice(gi * G, (gi + 1) * G)
        r = rewards[sl]
        if max(r) == min(r):
            zero_std += 1
        else:
            signal_tokens += sum(len(c) for c in roll.completions[sl])
        credits: Credits = select(roll.completions[sl], r, cfg, select_rng)
        if len(credits):
            signal_groups += 1
        for i, t, a, w in zip(credits.seq, credits.pos, credits.adv, credits.weight, strict=True):
            rows.append(gi * G + i)
            cols.append(t)
            adv.append(a)
            weight.append(w)
        if cfg.use_replay:  # keep successes with their last branch point, for replay-based resampling
            g, branch = groups[gi], last_branch_points(roll.completions[sl])
            successes += [(problem_index[g.problem.id], g.prefix + roll.completions[gi * G + i],
                           len(g.prefix) + branch[i]) for i in range(G) if r[i] > 0]

    # --- loss on the credited positions, micro-batched over groups ---
    device = accel.device
    lp = accel.unwrap_model(policy_lp)
    per_mb = max(1, cfg.micro_batch_size // G)
    credited = sorted({r_ // G for r_ in rows}) or [0]  # groups with at least one credited token
    batches = [credited[i: i + per_mb] for i in range(0, len(credited), per_mb)]
    loss_total, kl_total = 0.0, 0.0
    for bi, gids in enumerate(batches):
        # a rank with no credit still runs one zero-weight backward, so data-parallel ranks stay in step
        idx = [j for j, r_ in enumerate(rows) if r_ // G in gids] or None
        comp_rows = sorted({rows[j] for j in idx}) if idx else [gids[0] * G]
        local_row = {r_: k for k, r_ in enumerate(comp_rows)}
        local_ctx = {g: k for k, g in enumerate(gids)}
        batch = dict(ctx_ids=roll.context_ids[gids].to(device), ctx_mask=roll.context_mask[gids].to(device),
                     comp_ids=roll.completion_ids[comp_rows].to(device),
                     comp_mask=roll.completion_mask[comp_rows].to(device),
                     row_ctx=torch.tensor([local_ctx[r_ // G] for r_ in comp_rows], device=device),
                     rows=torch.tensor([local_row[rows[j]] for j in idx] if idx else [0], device=device),
                     pos=torch.tensor([cols[j] for j in idx] if idx else [0], device=device))
        a_loc = torch.tensor([adv[j] for j in idx] if idx else [0.0], device=device)
        w_loc = torch.tensor([weight[j] / max(signal_groups, 1) for j in idx] if idx else [0.0], device=device)
        with accel.autocast():
            logp = policy_lp(**batch)
            ref = None
            if cfg.beta > 0 or cfg.log_kl:
                with torch.no_grad(), lp.model.disable_adapter():
                    ref = lp(**batch)
            loss, kl = policy_loss(logp, a_loc, w_loc, ref, cfg.beta)
        with accel.no_sync(policy_lp) if bi < len(batches) - 1 else contextlib.nullcontext():
            accel.backward(loss)
        loss_total += float(loss.detach())
        kl_total += float(kl)

    n_tokens = sum(len(c) for c in roll.completions)
    return dict(loss=loss_total, kl=kl_total, rewards=rewards, zero_std=zero_std, signal_groups=signal_groups,
                tokens_in_loss=len(rows), tokens_total=n_tokens, tokens_in_signal_groups=signal_tokens,
                successes=successes,
                completion_len_mean=n_tokens / len(roll.completions),
                clipped_ratio=sum(roll.truncated) / len(roll.truncated), rollout_seconds=rollout_s)


# ----------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------

def train(config: TrainConfig | None = None, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, **overrides) -> dict[str, Any]:
    """Train a LoRA adapter with `config.algo`; returns the final summary (also written to final.json)."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    from .models import load_model

    if config is None:
        config = make_config(overrides.pop("profile", "embedded"), overrides=overrides)
    elif overrides:
        config = make_config(config.profile, overrides={**config.to_dict(), **overrides})
    cfg = config.validate()

    accel = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if accel.device.type == "cpu":
        set_threads(cfg.threads)
    main = accel.is_main_process
    out = Path(cfg.out)
    if resume and (out / "final.json").is_file() and not overwrite:
        final = json.loads((out / "final.json").read_text())
        if final.get("steps_done", 0) >= cfg.steps and final.get("algo") == cfg.algo:
            return final

    task = make_task(cfg)
    train_problems, test_problems = task.problems("train"), task.problems("test")
    if cfg.eval_limit:
        test_problems = test_problems[: cfg.eval_limit]
    problem_index = {p.id: i for i, p in enumerate(train_problems)}

    seed_everything(cfg.seed)
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" and torch.cuda.is_available() else torch.float32
    model, tok = load_model(cfg.model, dtype=dtype)
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise TokeneffError(f"lora_targets: module {missing[0]!r} is not in {cfg.model}")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # Only now, with task and model loaded without error, does anything get written.
    if main:
        _prepare_out_dir(cfg, resume, overwrite)
    accel.wait_for_everyone()
    policy = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                              lora_dropout=cfg.lora_dropout, target_modules=targets,
                                              task_type="CAUSAL_LM"))
    policy_lp = SelectiveLogProbs(policy, cfg.lm_head_tile, temperature=cfg.temperature)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    policy_lp, optimizer = accel.prepare(policy_lp, optimizer)

    # Loop state: everything needed to continue bit-for-bit after a crash.
    order_rng = random.Random(cfg.seed)
    order = list(range(len(train_problems)))
    order_rng.shuffle(order)
    select_rng, replay_rng = random.Random(cfg.seed + 1), random.Random(cfg.seed + 2)
    start, data_pos, bad_in_row, replay_buf = 0, accel.process_index * cfg.prompts_per_step, 0, []
    evals: list[dict[str, Any]] = []
    state = _load_checkpoint(out, accel.unwrap_model(policy_lp).model, optimizer) if resume else None
    if state:
        start, data_pos, bad_in_row = state["step"], state["data_pos"], state["bad_in_row"]
        replay_buf = [tuple(x) for x in state["replay_buf"]]
        evals = state["evals"]
        select_rng.setstate(_rng_state_from_json(state["select_rng"]))
        replay_rng.setstate(_rng_state_from_json(state["replay_rng"]))
    if main:
        write_json(out / "config.json", cfg.to_dict())
    log = MetricsLog(out / "metrics.jsonl", start + 1, main)

    def run_eval(step: int) -> float:
        t = time.perf_counter()
        res = evaluate_model(accel.unwrap_model(policy_lp).model, tok, task, test_problems, cfg.eval_batch_size,
                             cfg.eval_max_new_tokens or cfg.max_new_tokens, progress and main, cfg.rollout_backend)
        evals.append(dict(step=step, accuracy=res["accuracy"], n=res["n"], seconds=time.perf_counter() - t))
        if main:
            write_json(out / f"eval_step{step}.json", res)
        return res["accuracy"]

    def save(step: int) -> None:
        if main:
            _save_checkpoint(out, accel.unwrap_model(policy_lp).model, optimizer, dict(
                step=step, data_pos=data_pos, bad_in_row=bad_in_row, replay_buf=replay_buf, evals=evals,
                select_rng=_rng_state_to_json(select_rng.getstate()),
                replay_rng=_rng_state_to_json(replay_rng.getstate())))

    if start == 0 and not evals and cfg.eval_at_start:
        acc = run_eval(0)
        log.write(dict(step=0, eval_accuracy=acc))

    policy_lp.train()
    step = done = start
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"{cfg.algo} {cfg.task}",
               disable=not (progress and main))
    try:
        for step_i in bar:
            step = step_i + 1
            t0 = time.perf_counter()
            groups, data_pos = _pick_groups(cfg, train_problems, order, data_pos, tok, task, replay_buf, replay_rng)
            r = _train_step(cfg, accel, policy_lp, tok, task, groups, select_rng, problem_index)
            grad_norm = accel.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            finite = math.isfinite(r["loss"]) and (grad_norm is None or torch.isfinite(grad_norm).item())
            if finite:
                optimizer.step()
                bad_in_row = 0
            else:
                bad_in_row += 1
            optimizer.zero_grad(set_to_none=True)
            if cfg.use_replay:
                replay_buf = (replay_buf + [(p, t, b) for p, t, b in r["successes"]])[-cfg.replay_buffer_size:]
            data_pos += (accel.num_processes - 1) * cfg.prompts_per_step  # ranks take interleaved prompts

            rewards = torch.tensor(r["rewards"], device=accel.device)
            stats = torch.tensor([r["zero_std"], len(groups), r["tokens_in_loss"], r["tokens_total"],
                                  r["loss"], r["kl"], r["tokens_in_signal_groups"]], device=accel.device,
                                 dtype=torch.float64)
            rewards, stats = accel.gather(rewards), accel.reduce(stats, "sum")
            n_proc = accel.num_processes
            row = dict(step=step, reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                       frac_groups_zero_std=float(stats[0] / stats[1]), loss=float(stats[4] / n_proc),
                       kl=float(stats[5] / n_proc), tokens_in_loss=int(stats[2]), tokens_total=int(stats[3]),
                       frac_tokens_in_loss=float(stats[2] / max(stats[3], 1)),
                       tokens_in_signal_groups=int(stats[6]),
                       completion_len_mean=r["completion_len_mean"], clipped_ratio=r["clipped_ratio"],
                       grad_norm=float(grad_norm) if grad_norm is not None else None, skipped=not finite,
                       replay_buffer=len(replay_buf), rollout_seconds=r["rollout_seconds"])
            if not finite:
                tqdm.write(f"step {step}: non-finite loss, update skipped ({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_bad_steps:
                    raise TokeneffError(f"{bad_in_row} non-finite losses in a row: stopping (lower lr?)")
            row["step_seconds"] = time.perf_counter() - t0
            row["peak_memory_mb"] = peak_memory_mb(accel.device)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                row["eval_accuracy"] = run_eval(step)
            log.write(row)
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}", tok=f"{row['frac_tokens_in_loss']:.0%}")
            done = step
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(step)
    except KeyboardInterrupt:
        save(done)
        if main:
            print(f"\ninterrupted: checkpoint saved in {out}/checkpoint. Resume with the same command plus "
                  "--resume")
        raise

    if main:
        accel.unwrap_model(policy_lp).model.save_pretrained(out / "adapter")
    # Data-parallel ranks must end with the same adapter: record a checksum per rank.
    checksum = torch.stack([p.detach().double().abs().sum() for p in params]).sum().reshape(1).to(accel.device)
    final = dict(rank_adapter_checksums=accel.gather(checksum).tolist(),
                 steps_done=step, algo=cfg.algo, task=cfg.task, model=cfg.model, profile=cfg.profile,
                 seed=cfg.seed, evals=evals, base_accuracy=evals[0]["accuracy"] if evals else None,
                 final_accuracy=evals[-1]["accuracy"] if evals else None)
    if main:
        write_json(out / "final.json", final)
    accel.wait_for_everyone()
    return final


def install_sigterm_handler() -> None:
    """Turn SIGTERM into KeyboardInterrupt so that a polite kill also checkpoints. SIGINT is reset to Python's
    handler too: a process started in the background by a shell inherits SIGINT ignored."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.signal(signal.SIGINT, signal.default_int_handler)
