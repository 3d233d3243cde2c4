"""The one training loop shared by GRPO, S-GRPO and T-SPMO.

Per step: pick prompts (the algorithm's group sampler may restart some from a partial answer) -> sample G
completions each (one batch) -> reward -> the algorithm's `select` gives (completion, position, advantage,
weight) credits -> log-probs at the credited positions only -> policy-gradient loss (+ beta * KL to the
adapter-free reference) -> one AdamW update of the LoRA weights. The loop knows no algorithm by name: it calls
`algorithms.ALGORITHMS[cfg.algo]` and `algorithms.group_sampler(cfg)`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
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

from .algorithms import ALGORITHMS, Credits, GroupSampler, group_sampler
from .checks import check_context, check_lora_targets, check_model_path, check_precision
from .config import TokeneffError, TrainConfig, make_config
from .evaluate import evaluate_model
from .loss import SelectiveLogProbs, policy_loss
from .rollout import build_prompt, decode, encode_prompts, sample
from .rundir import (
    CKPT,
    FORMAT_KEY,
    MANIFEST,
    RUN_FORMAT,
    TMP,
    RunLock,
    check_out,
    clear_run,
    disk_error,
    finish_save,
    fsync_path,
    hook,
    recover_checkpoints,
    say,
    start_save,
)
from .tasks import Problem, make_task
from .utils import atomic_write_bytes, memory_mb, seed_everything, set_threads, write_json

TIMING_KEYS = ("step_seconds", "rollout_seconds", "peak_memory_mb")  # metrics.jsonl keys that vary run to run


@dataclass
class Group:
    """One prompt's G completions; `prefix` is a partial answer they continue (picked by the algorithm's group
    sampler) or empty; `index` is the problem's position in the training split."""
    problem: Problem
    index: int
    prompt_ids: list[int]
    prefix: list[int]


# ----------------------------------------------------------------------------------------------------------
# plumbing: checkpoints, metrics (the run directory's rules are in rundir.py)
# ----------------------------------------------------------------------------------------------------------

def _numpy_state() -> list:
    s = np.random.get_state()
    return [s[0], s[1].tolist(), *s[2:]]


def _set_numpy_state(s: list) -> None:
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))


def _load_checkpoint(out: Path, policy, optimizer, rank: int, world: int) -> dict[str, Any] | None:
    """Every rank restores the shared parts (adapter, optimiser) and its own (data position, RNGs, the group
    sampler's state). Rank 0 has already verified checkpoint/ (rundir.recover_checkpoints)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ck = out / CKPT
    man = json.loads((ck / MANIFEST).read_text()) if (ck / MANIFEST).is_file() else None
    if man is None:
        return _load_legacy_checkpoint(ck, policy, optimizer, world) if (ck / "state.json").is_file() else None
    n = man.get("num_processes", 1)
    if n != world:
        raise TokeneffError(f"out={str(out)!r}: its checkpoint (step {man['step']}) was written by {n} processes, "
                            f"this run has {world}: resume with {n} processes")
    set_peft_model_state_dict(policy, load_file(ck / "adapter" / "adapter_model.safetensors"))
    optimizer.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True))
    shared = json.loads((ck / "state.json").read_text())
    mine = torch.load(ck / f"rank{rank}.pt", weights_only=True)
    torch.set_rng_state(mine["torch_rng"])
    if mine["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda_rng"])
    _set_numpy_state(mine["numpy_rng"])
    random.setstate(mine["python_rng"])
    return dict(step=shared["step"], evals=shared["evals"], data_pos=mine["data_pos"], bad_in_row=mine["bad_in_row"],
                select_rng=mine["select_rng"], sampler=mine)


def _load_legacy_checkpoint(ck: Path, policy, optimizer, world: int) -> dict[str, Any]:
    """A checkpoint from before manifests (one process wrote everything)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if world != 1:
        raise TokeneffError(f"{str(ck)!r} predates per-process checkpoints: resume it with one process")
    set_peft_model_state_dict(policy, load_file(ck / "adapter" / "adapter_model.safetensors"))
    optimizer.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True))
    rng = torch.load(ck / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((ck / "state.json").read_text())
    _set_numpy_state(state.pop("numpy_rng"))
    state["select_rng"] = _rng_state_from_json(state["select_rng"])
    state["sampler"] = state  # the group sampler's keys are among the others (its RNG state as a JSON list)
    return state


def _rng_state_from_json(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


class MetricsLog:
    """metrics.jsonl, one JSON object per step. On (re)start, rows from `keep_below_step` on are dropped (the
    checkpoint is older than them), and so are a torn last line (a kill or a full disk during a write) and
    duplicate steps, each with a message."""

    def __init__(self, path: Path, keep_below_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not (enabled and path.is_file()):
            return
        lines = path.read_bytes().decode(errors="replace").split("\n")
        kept, bad, dup, seen = [], [], 0, set()
        last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
        for i, ln in enumerate(lines):
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
                step = int(row["step"])
            except (ValueError, TypeError, KeyError):
                bad.append(i)
                continue
            if step >= keep_below_step:
                continue
            if step in seen:
                dup += 1
                continue
            seen.add(step)
            kept.append(ln)
        if bad == [last]:
            say(f"{path}: dropped a torn last line (line {last + 1}, cut off by an interruption or a full disk)")
        elif bad:
            say(f"{path}: dropped unreadable line(s) {', '.join(str(i + 1) for i in bad)}")
        if dup:
            say(f"{path}: dropped {dup} duplicate step row(s)")
        text = "".join(ln + "\n" for ln in kept).encode()
        if text != path.read_bytes():
            atomic_write_bytes(path, text)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(row) + "\n"
        with self.path.open("a") as f:
            if os.environ.get("TOKENEFF_TEST_KILL_AT", "").startswith("torn"):  # test: a kill mid-line
                f.write(line[: len(line) // 2])
                f.flush()
                hook("torn")
                line = line[len(line) // 2:]
            f.write(line)
            f.flush()


# ----------------------------------------------------------------------------------------------------------
# the algorithm: one step
# ----------------------------------------------------------------------------------------------------------

def _pick_groups(cfg, problems, order, data_pos, tok, task, sampler: GroupSampler) -> tuple[list[Group], int]:
    """prompts_per_step problems in a seeded order, unless the group sampler picks a (problem, prefix)."""
    groups = []
    for _ in range(cfg.prompts_per_step):
        picked = sampler.pick()
        if picked is None:
            index, prefix = order[data_pos % len(order)], []
            data_pos += 1
        else:
            index, prefix = picked
        problem = problems[index]
        prompt = encode_prompts(tok, [build_prompt(tok, task.messages(problem))])[0]
        groups.append(Group(problem, index, prompt, prefix))
    return groups, data_pos


def _train_step(cfg, accel, policy_lp, tok, task, groups, select_rng, sampler: GroupSampler) -> dict[str, Any]:
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
    zero_std, signal_groups, signal_tokens = 0, 0, 0
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
        sampler.record(groups[gi].index, groups[gi].prefix, roll.completions[sl], r)

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
                completion_len_mean=n_tokens / len(roll.completions),
                clipped_ratio=sum(roll.truncated) / len(roll.truncated), rollout_seconds=rollout_s)


# ----------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------

def train(config: TrainConfig | None = None, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, **overrides) -> dict[str, Any]:
    """Train a LoRA adapter with `config.algo`; returns the final summary (also written to final.json).

    resume: continue the run in `config.out` from its newest complete checkpoint (a finished run returns its
    final.json at once; a new or empty folder starts at step 0). overwrite: delete the run in `config.out` first
    (only a tokeneff run directory holding nothing else; see rundir.py).
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
    main = accel.is_main_process
    out = Path(cfg.out)
    kind = check_out(cfg.to_dict(), resume, overwrite)  # read-only: before anything is loaded or written
    if resume and kind == "run" and (out / "final.json").is_file():
        final = json.loads((out / "final.json").read_text())
        if final.get("steps_done", 0) >= cfg.steps and final.get("algo") == cfg.algo:
            _check_finished_run(out, final, cfg)
            if progress and main:
                say(f"{out} finished at step {final['steps_done']}: nothing to resume")
            return final
    check_model_path(cfg.model)
    accel.wait_for_everyone()
    lock = RunLock(out).acquire() if main else None  # one process per run directory
    try:
        if main:
            kind = check_out(cfg.to_dict(), resume, overwrite)  # again, now that no other process can change it
        return _train_locked(cfg, accel, out, kind, resume, overwrite, progress)
    finally:
        if lock is not None:  # a folder this call created is removed again if the run never started
            lock.release(remove_created=not (out / "config.json").is_file())


# A finished run's results were measured with these: returning them for other values would mislabel them.
RESULT_KEYS = ("eval_limit", "eval_max_new_tokens", "eval_every", "eval_at_start")


def _check_finished_run(out: Path, final: dict[str, Any], cfg: TrainConfig) -> None:
    if final["steps_done"] > cfg.steps:
        raise TokeneffError(f"out={str(out)!r} finished at step {final['steps_done']}; steps={cfg.steps} asks for "
                            "fewer, which its results cannot show: use another --out")
    old = json.loads((out / "config.json").read_text())
    for k in RESULT_KEYS:
        if k in old and old[k] != getattr(cfg, k):
            raise TokeneffError(f"out={str(out)!r} finished with {k}={old[k]!r} (its results were measured so); "
                                f"{k}={getattr(cfg, k)!r} now would mislabel them: use another --out")


def _train_locked(cfg: TrainConfig, accel, out: Path, kind: str, resume: bool, overwrite: bool,
                  progress: bool) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from .models import load_model

    main = accel.is_main_process
    task = make_task(cfg)
    train_problems, test_problems = task.problems("train"), task.problems("test")
    for split, probs in (("train", train_problems), ("test", test_problems)):
        if not probs:
            raise TokeneffError(f"task {cfg.task!r}: its {split} split is empty")
    if cfg.eval_limit:
        test_problems = test_problems[: cfg.eval_limit]

    seed_everything(cfg.seed)
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" and torch.cuda.is_available() else torch.float32
    model, tok = load_model(cfg.model, dtype=dtype)
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    check_lora_targets(model, targets, cfg.model)
    check_context(model, tok, task, train_problems + test_problems, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # Only now, with task and model loaded without error, does anything in the run directory change.
    if main:
        if overwrite and kind == "run":
            clear_run(out)
        if resume and kind == "run":
            recover_checkpoints(out)
        try:
            write_json(out / "config.json", {**cfg.to_dict(), FORMAT_KEY: RUN_FORMAT})
        except OSError as e:
            raise disk_error(e, f"{out}/config.json") from None
    accel.wait_for_everyone()
    policy = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                              lora_dropout=cfg.lora_dropout, target_modules=targets,
                                              task_type="CAUSAL_LM"))
    policy_lp = SelectiveLogProbs(policy, cfg.lm_head_tile, temperature=cfg.temperature)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    policy_lp, optimizer = accel.prepare(policy_lp, optimizer)

    # Loop state: everything needed to continue bit-for-bit after a crash, per rank.
    order_rng = random.Random(cfg.seed)
    order = list(range(len(train_problems)))
    order_rng.shuffle(order)
    select_rng, sampler = random.Random(cfg.seed + 1), group_sampler(cfg)
    start, data_pos, bad_in_row = 0, accel.process_index * cfg.prompts_per_step, 0
    evals: list[dict[str, Any]] = []
    rank, world = accel.process_index, accel.num_processes
    state = _load_checkpoint(out, accel.unwrap_model(policy_lp).model, optimizer, rank, world) if resume else None
    if state:
        start, data_pos, bad_in_row = state["step"], state["data_pos"], state["bad_in_row"]
        evals = state["evals"]
        select_rng.setstate(state["select_rng"])
        sampler.load_state_dict(state["sampler"])
    if resume and main:
        if state:
            say(f"resuming from step {start} ({out / CKPT})")
        elif kind == "run" or progress:
            say(f"no checkpoint in {out}: starting at step 0")
    log = MetricsLog(out / "metrics.jsonl", start + 1 if state else 0, main)

    def run_eval(step: int) -> float:
        t = time.perf_counter()
        res = evaluate_model(accel.unwrap_model(policy_lp).model, tok, task, test_problems, cfg.eval_batch_size,
                             cfg.eval_max_new_tokens or cfg.max_new_tokens, progress and main, cfg.rollout_backend)
        evals.append(dict(step=step, accuracy=res["accuracy"], n=res["n"], seconds=time.perf_counter() - t))
        if main:
            write_json(out / f"eval_step{step}.json", res)
        return res["accuracy"]

    def save(step: int) -> None:
        """Each rank writes its own state into checkpoint.tmp/, rank 0 the shared parts, the manifest and the
        swap (rundir.finish_save)."""
        try:
            if main:
                start_save(out)
            accel.wait_for_everyone()
            torch.save(dict(data_pos=data_pos, bad_in_row=bad_in_row, select_rng=select_rng.getstate(),
                            **sampler.state_dict(), python_rng=random.getstate(), numpy_rng=_numpy_state(),
                            torch_rng=torch.get_rng_state(),
                            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
                       out / TMP / f"rank{rank}.pt")
            hook("partial")
            accel.wait_for_everyone()
            if main:
                accel.unwrap_model(policy_lp).model.save_pretrained(out / TMP / "adapter")
                torch.save(optimizer.state_dict(), out / TMP / "optimizer.pt")
                write_json(out / TMP / "state.json", dict(step=step, evals=evals, num_processes=world))
                fsync_path(out / "metrics.jsonl")  # the rows this checkpoint covers reach the disk before it does
                finish_save(out, dict(format=RUN_FORMAT, step=step, num_processes=world))
        except OSError as e:
            raise disk_error(e, f"the checkpoint of step {step} in {out}") from None

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
            groups, data_pos = _pick_groups(cfg, train_problems, order, data_pos, tok, task, sampler)
            r = _train_step(cfg, accel, policy_lp, tok, task, groups, select_rng, sampler)
            grad_norm = accel.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            finite = math.isfinite(r["loss"]) and (grad_norm is None or torch.isfinite(grad_norm).item())
            if finite:
                optimizer.step()
                bad_in_row = 0
            else:
                bad_in_row += 1
            optimizer.zero_grad(set_to_none=True)
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
                       **sampler.metrics(), rollout_seconds=r["rollout_seconds"])
            if not finite:
                tqdm.write(f"step {step}: non-finite loss, update skipped ({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_bad_steps:
                    raise TokeneffError(f"{bad_in_row} non-finite losses in a row: stopping (lower lr?)")
            row["step_seconds"] = time.perf_counter() - t0
            row["peak_memory_mb"] = memory_mb(peak=True, device=accel.device)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                row["eval_accuracy"] = run_eval(step)
            log.write(row)
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}", tok=f"{row['frac_tokens_in_loss']:.0%}")
            done = step
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(step)
    except KeyboardInterrupt:
        if world == 1:  # several ranks cannot agree on a last save after a signal: their last checkpoint stands
            recover_checkpoints(out)  # the interrupt may have landed inside a save
            save(done)
        if main:
            ck = json.loads((out / CKPT / MANIFEST).read_text())["step"] if (out / CKPT / MANIFEST).is_file() else 0
            print(f"\ninterrupted: checkpoint of step {ck} saved in {out}/{CKPT}. Resume with the same command plus "
                  "--resume")
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise disk_error(e, f"{out} at step {step}") from None
        raise

    if main:
        try:  # adapter/ and final.json are replaced together: final.json is written last
            (out / "final.json").unlink(missing_ok=True)
            shutil.rmtree(out / "adapter.tmp", ignore_errors=True)
            accel.unwrap_model(policy_lp).model.save_pretrained(out / "adapter.tmp")
            shutil.rmtree(out / "adapter", ignore_errors=True)
            os.replace(out / "adapter.tmp", out / "adapter")
        except OSError as e:
            raise disk_error(e, f"{out}/adapter") from None
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
