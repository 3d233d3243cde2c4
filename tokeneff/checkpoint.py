"""Saving and loading a run's checkpoint: the shared parts (LoRA adapter, optimiser, step, evaluations) once, and
each data-parallel rank's own loop state (`train.LoopState.state_dict()`: data position, RNGs, the group
sampler's state) in `rank<r>.pt`. The directory protocol (checkpoint.tmp -> manifest -> swap, recovery after a
kill) is `rundir/`'s; this file only says what goes in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import TokeneffError
from .rundir import CKPT, MANIFEST, RUN_FORMAT, TMP, _faults, finish_save, fsync_path, start_save, writing
from .utils import ordinary_permissions, write_json


def save_checkpoint(out: Path, accel, policy, optimizer, step: int, evals: list[dict[str, Any]],
                    rank_state: dict[str, Any]) -> None:
    """Every rank writes its own state into checkpoint.tmp/, rank 0 the shared parts, the manifest and the swap."""
    main, world = accel.is_main_process, accel.num_processes
    with writing(f"the checkpoint of step {step} in {out}"):  # OSError, SafetensorError, torch.save's RuntimeError
        if main:
            start_save(out)
        accel.wait_for_everyone()
        torch.save(rank_state, out / TMP / f"rank{accel.process_index}.pt")
        _faults.hook("partial")
        accel.wait_for_everyone()
        if main:
            policy.save_pretrained(out / TMP / "adapter")
            ordinary_permissions(out / TMP / "adapter")
            torch.save(optimizer.state_dict(), out / TMP / "optimizer.pt")
            write_json(out / TMP / "state.json", dict(step=step, evals=evals, num_processes=world))
            fsync_path(out / "metrics.jsonl")  # the rows this checkpoint covers reach the disk before it does
            finish_save(out, dict(format=RUN_FORMAT, step=step, num_processes=world))


def load_checkpoint(out: Path, policy, optimizer, rank: int, world: int) -> dict[str, Any] | None:
    """Restore the adapter and optimiser in place; return this rank's loop state (with `step` and `evals`), or
    None when there is no checkpoint. Rank 0 has already verified checkpoint/ (rundir.recover_checkpoints)."""
    ck = out / CKPT
    man = json.loads((ck / MANIFEST).read_text()) if (ck / MANIFEST).is_file() else None
    if man is None:
        return None
    n = man.get("num_processes", 1)
    if n != world:
        raise TokeneffError(f"out={str(out)!r}: its checkpoint (step {man['step']}) was written by {n} processes, "
                            f"this run has {world}: resume with {n} processes")
    _restore_shared(ck, policy, optimizer)
    shared = json.loads((ck / "state.json").read_text())
    return {**torch.load(ck / f"rank{rank}.pt", weights_only=True), "step": shared["step"], "evals": shared["evals"]}


def _restore_shared(ck: Path, policy, optimizer) -> None:
    """The parts every rank shares: the LoRA adapter and the optimiser state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(policy, load_file(ck / "adapter" / "adapter_model.safetensors"))
    optimizer.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True))
