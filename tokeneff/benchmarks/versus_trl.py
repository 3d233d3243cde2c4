"""`tokeneff bench --vs-trl`: whole training steps, ours vs TRL's `GRPOTrainer`, at the same settings.

Both sides: the same model and tokenizer, the same SVAMP prompts (chat template, the task's instruction and
worked example), one prompt x G completions of at most `max_new_tokens` per step (sampled at temperature 1,
no top-k/top-p), LoRA r16 on q/k/v/o, AdamW, beta 0 (no reference model). Each side runs in its own
subprocess so that its peak memory is its own; a third subprocess loads the model with its adapter and
nothing else, which is what "above the weights" subtracts. The first step carries one-off costs (allocator
warm-up, lazy init), so it is reported apart and the ratio uses the mean of the later steps.

Random weights (`shape`) never solve a problem: every group would have equal rewards, so our algorithms would
skip the update (no signal) while TRL still runs its loss. Both sides then get `synthetic_reward` instead (every
other completion of a group rewarded, as in `tokeneff bench`'s synthetic groups), so every group carries signal.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import ALGOS, LoraSettings, make_config
from ..errors import TokeneffError
from ..loop import train
from ..models import load_model
from ..tasks import make_task
from ..utils import memory_mb
from ..warmstart import model_folder
from .benchio import device_name, run_in_subprocess, save_random_shape, save_result

# Every side builds its adapter from this one object (r 16, alpha 32, dropout 0.05 on q/k/v/o): the same settings on
# both sides by construction.
LORA = LoraSettings()


def _svamp_task():
    return make_task(make_config("embedded", overrides=dict(task="svamp")))


def synthetic_reward(prompts: list, completions: list, **columns) -> list[float]:
    """TRL's reward signature; 1 for every other completion (rows of a group are consecutive on both sides), so
    that every group has reward variance whatever the model writes: for timing steps of random-weight models."""
    return [float(i % 2) for i in range(len(completions))]


def synthetic_task():
    """SVAMP whose training reward is `synthetic_reward` (evaluation, which checks answers, is unchanged)."""
    task = _svamp_task()
    task.reward = synthetic_reward
    return task


def _dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def weights_only(spec: dict[str, Any]) -> dict[str, Any]:
    """Memory held by the model and its LoRA adapter alone (the baseline both sides are measured above)."""
    from peft import get_peft_model

    model, _ = load_model(model_folder(spec["model"]), dtype=_dtype())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    get_peft_model(model.to(device), LORA.peft_config())
    return dict(side="weights", peak_memory_mb=memory_mb(peak=True))


def tokeneff_side(spec: dict[str, Any]) -> dict[str, Any]:
    backend = spec.get("rollout_backend") or make_config("embedded").rollout_backend  # recorded in the row
    gemm = spec.get("gemm", "auto")
    with tempfile.TemporaryDirectory() as tmp:
        train(custom_task=synthetic_task() if spec.get("reward") == "synthetic" else None,
              profile="embedded", model=spec["model"], task="svamp", algo=spec["algo"], steps=spec["steps"],
              group_size=spec["group_size"], prompts_per_step=1, max_new_tokens=spec["max_new_tokens"],
              beta=0.0, log_kl=False, **dataclasses.asdict(LORA),
              lr=1e-5, eval_at_start=False, eval_limit=1, save_every=spec["steps"], out=tmp,
              gradient_checkpointing=spec.get("gradient_checkpointing", False), rollout_backend=backend,
              rollout_gemm=gemm, train_gemm=gemm,
              mixed_precision="bf16" if torch.cuda.is_available() else "no", progress=False)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_seconds" in r]
    return dict(side=f"tokeneff-{spec['algo']}", rollout_backend=backend, gemm=gemm,
                step_seconds=[r["step_seconds"] for r in rows],
                rollout_seconds=[r["rollout_seconds"] for r in rows],
                tokens_in_loss=[r["tokens_in_loss"] for r in rows],
                completion_len_mean=[r["completion_len_mean"] for r in rows], peak_memory_mb=memory_mb(peak=True))


def trl_side(spec: dict[str, Any], trainer_cls=None) -> dict[str, Any]:
    """TRL's GRPOTrainer (or `trainer_cls`, a subclass taking the same arguments) for spec["steps"] steps."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    task = _svamp_task()
    problems = task.problems("train")[: spec["steps"]]
    data = Dataset.from_list([dict(prompt=task.messages(p), answer=p.answer) for p in problems])
    model, tok = load_model(model_folder(spec["model"]), dtype=_dtype())
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    G = spec["group_size"]
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=G, num_generations=G,
                          max_completion_length=spec["max_new_tokens"], max_steps=spec["steps"], learning_rate=1e-5,
                          beta=0.0, temperature=1.0, top_k=0, top_p=1.0, logging_steps=1, report_to=[],
                          save_strategy="no", shuffle_dataset=False, seed=0, use_cpu=not torch.cuda.is_available(),
                          bf16=torch.cuda.is_available(), gradient_checkpointing=spec.get("gradient_checkpointing",
                                                                                          False),
                          disable_tqdm=True)
        reward = synthetic_reward if spec.get("reward") == "synthetic" else task.reward
        trainer_cls = trainer_cls or GRPOTrainer
        trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                              peft_config=LORA.peft_config(),
                              callbacks=[StepTimer()])
        trainer.train()
    lens = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return dict(side="trl-grpo", step_seconds=times, completion_len_mean=lens, peak_memory_mb=memory_mb(peak=True))


def trl_tokeneff_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Our SGRPOTrainer or TSPMOTrainer (`spec["algo"]`) in place of TRL's GRPOTrainer, every other setting as in
    `trl_side` (S-GRPO's alpha, P, k: the embedded profile's, as in the `tokeneff-sgrpo` row)."""
    from ..trl_trainers import SGRPOTrainer, TSPMOTrainer  # here: it loads TRL's trainer, needed by this side only

    algo = spec["algo"]
    cfg = make_config("embedded")
    cls = (functools.partial(SGRPOTrainer, sgrpo_alpha=cfg.sgrpo_alpha, sgrpo_p=cfg.sgrpo_p, sgrpo_k=cfg.sgrpo_k)
           if algo == "sgrpo" else TSPMOTrainer)
    return dict(trl_side(spec, trainer_cls=cls), side=f"trl-{algo}")


SIDES = {"weights": weights_only, "tokeneff": tokeneff_side, "trl": trl_side, "trl-tokeneff": trl_tokeneff_side}


def _run_side(spec: dict[str, Any]) -> dict[str, Any]:
    return run_in_subprocess("tokeneff.benchmarks.versus_trl", spec, f"--vs-trl: the {spec['side']} run")


def versus_trl(model: str = "smollm2-135m", shape: str | None = None, group_size: int = 8, max_new_tokens: int = 96,
               steps: int = 3,
               algos: tuple[str, ...] = ALGOS, gradient_checkpointing: bool = False,
               out: str | None = "results/benchmarks", progress: bool = True,
               trl_trainers: tuple[str, ...] = ("sgrpo", "tspmo"), gemm: str = "auto") -> dict[str, Any]:
    """TRL first, then each of our algorithms; returns rows plus ratios to TRL (time per warm step, peak memory
    above the weights). Writes vs_trl_<device>_<model>.json and .csv into `out` unless it is None, rewritten after
    each side (`complete` false until the last), so an interrupted run keeps the sides it finished.
    `shape` (e.g. qwen2-1.5b, GPU only): random weights of that shape instead of `model`, saved to a temp dir, and
    `synthetic_reward` on both sides (random weights earn no reward, so no group would carry signal).
    `trl_trainers`: also our SGRPOTrainer / TSPMOTrainer (trl_trainers.py) inside TRL, as rows `trl-sgrpo` /
    `trl-tspmo`, run last. `gemm`: our side's rollout_gemm and train_gemm (torch: the products TRL uses)."""
    if importlib.util.find_spec("trl") is None:
        raise TokeneffError("--vs-trl needs trl: pip install 'trl==1.16.0'")
    if steps < 2:
        raise TokeneffError(f"--steps={steps}: --vs-trl needs at least 2 steps (the first one is warm-up)")
    base = dict(group_size=group_size, max_new_tokens=max_new_tokens, steps=steps,
                gradient_checkpointing=gradient_checkpointing, gemm=gemm)
    if not shape:
        return _compare(dict(base, model=model, reward="task"), algos, out, Path(model).name, model, progress,
                        trl_trainers)
    if shape == "qwen2-1.5b" and not torch.cuda.is_available():
        raise TokeneffError(f"--shape {shape} needs a GPU (it trains a 1.5B-parameter model)")
    with tempfile.TemporaryDirectory() as tmp:
        return _compare(dict(base, model=save_random_shape(shape, tmp), reward="synthetic"), algos, out, shape,
                        f"{shape} (random weights)", progress, trl_trainers)


def _compare(base: dict[str, Any], algos, out: str | None, name: str, label: str, progress: bool,
             trl_trainers=()) -> dict[str, Any]:
    specs = ([dict(base, side="weights"), dict(base, side="trl")] + [dict(base, side="tokeneff", algo=a) for a in algos]
             + [dict(base, side="trl-tokeneff", algo=a) for a in trl_trainers])
    rows: list[dict[str, Any]] = []
    for s in tqdm(specs, desc="vs-trl", disable=not progress):
        rows.append(_run_side(s))
        if len(rows) > 1:  # the weights and TRL are in: save what there is
            result = _summarise(dict(base, model=label), rows, complete=len(rows) == len(specs))
            _save(result, out, name)
    return result


def _summarise(base: dict[str, Any], rows: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
    weights = rows[0]["peak_memory_mb"]  # the model and adapter alone; rows[1] is TRL
    sides = [dict(r) for r in rows[1:]]
    for r in sides:
        warm = r["step_seconds"][1:]
        r["first_step_seconds"] = r["step_seconds"][0]
        r["warm_step_seconds"] = sum(warm) / len(warm)
        r["peak_above_weights_mb"] = r["peak_memory_mb"] - weights
    ref = sides[0]
    for r in sides:
        r["time_ratio_to_trl"] = r["warm_step_seconds"] / ref["warm_step_seconds"]
        r["memory_ratio_to_trl"] = r["peak_above_weights_mb"] / max(ref["peak_above_weights_mb"], 1e-9)
        r["peak_ratio_to_trl"] = r["peak_memory_mb"] / ref["peak_memory_mb"]
    return dict(base, device=device_name(), torch=torch.__version__, weights_memory_mb=weights, rows=sides,
                complete=complete,
                memory_measure="CUDA max allocated" if torch.cuda.is_available() else "peak RSS of the process")


def _save(result: dict[str, Any], out: str | None, name: str) -> dict[str, Any]:
    if out:
        tag = ("gpu" if torch.cuda.is_available() else "cpu") + "_" + name
        save_result(Path(out) / f"vs_trl_{tag}", result, result["rows"])
    return result


def print_versus(res: dict[str, Any]) -> None:
    print(f"{res['device']}, {res['model']}, G={res['group_size']}, <= {res['max_new_tokens']} new tokens, "
          f"weights+adapter {res['weights_memory_mb']:.0f} MiB")
    for r in res["rows"]:
        print(f"{r['side']:<16} warm step {r['warm_step_seconds']:6.2f} s ({r['time_ratio_to_trl']:.2f}x TRL)  "
              f"peak above weights {r['peak_above_weights_mb']:7.0f} MiB ({r['memory_ratio_to_trl']:.2f}x TRL)  "
              f"mean completion {sum(r['completion_len_mean']) / len(r['completion_len_mean']):.1f} tokens")


if __name__ == "__main__":  # one side, in a fresh process
    spec = json.loads(sys.argv[1])
    print(json.dumps(SIDES[spec["side"]](spec)))
