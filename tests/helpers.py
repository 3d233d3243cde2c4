"""What several test files share: the tiny run's command-line settings, the one-line error contract, a
snapshot of a folder (to prove that nothing in it changed) and a tiny policy whose adapter changes its output."""

from __future__ import annotations

import os
from pathlib import Path

from tokeneff.cli import main

# A run in seconds: random weights, 1x1-digit products, one prompt of two completions per step, two held-out problems.
TINY_CLI = ["--model", "tiny-random", "--task", "multiplication", "digits_a=1", "digits_b=1", "group_size=2",
            "prompts_per_step=1", "eval_limit=2", "eval_batch_size=2"]


def error_line(err: str) -> str:
    """The last line of stderr, which must be tokeneff's one-line error (lines before it may be progress)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("tokeneff: error:"), err
    return lines[-1]


def refused(capsys, argv, needle: str, alone: bool = True) -> str:
    """`tokeneff <argv>` exits 2 with one line naming `needle`, no traceback (alone: nothing else on stderr); returns
    that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    if alone:
        assert len(err.strip().splitlines()) == 1, err
    line = error_line(err)
    assert needle in line, err
    return line


def tree(folder: Path) -> dict[str, bytes]:
    """Every entry under `folder` (links as links, never followed) with its content."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = (b"link:" + os.readlink(p).encode() if p.is_symlink()
                    else p.read_bytes() if p.is_file() else b"<dir>")
    return out


def refused_last_line(capsys, argv, needle: str) -> str:
    """`refused`, for commands that may print progress before their error (a run that fails while training)."""
    return refused(capsys, argv, needle, alone=False)


def policy_with_a_live_adapter(targets=("q_proj", "v_proj", "o_proj")):
    """The tiny random model under a LoRA adapter whose B is not zero (as after training), and its tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tokeneff.models import tiny_random

    model, tok = tiny_random(seed=1)
    torch.manual_seed(0)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # B starts at zero: make the adapter change the model
    return policy, tok
