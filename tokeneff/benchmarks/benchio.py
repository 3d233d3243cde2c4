"""What the benchmarks (`bench.py`, `versus_trl.py`) share: a configuration run in a fresh process, results saved
as JSON + CSV, the device's name, and a random-weight model of a given shape. Both import this module; neither
imports the other at the bottom of the stack (bench -> versus_trl -> benchio, bench -> benchio)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..errors import TokeneffError
from ..models import char_tokenizer
from ..utils import atomic_write_bytes, write_json

QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def run_in_subprocess(module: str, spec: dict[str, Any], what: str) -> dict[str, Any]:
    """`python -m module '<spec json>'` in a fresh process (so its peak memory is its own); its last stdout line
    is the JSON result. A failure raises one line: `what` and the last line of its stderr."""
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise TokeneffError(f"{what} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_result(stem: Path, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """stem.json (the whole result) and stem.csv (one line per row, list-valued fields left out), atomically."""
    write_json(f"{stem}.json", result)  # not with_suffix: names like qwen2-1.5b hold a dot
    flat = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, list)} for r in rows])
    atomic_write_bytes(f"{stem}.csv", flat.to_csv(index=False).encode())


def save_random_shape(shape: str, folder: str | Path) -> str:
    """A randomly initialised model of `shape` (bf16) with the character tokenizer, saved as an ordinary local
    checkpoint, so that whole-step comparisons (`--vs-trl --shape`) load it like any model: no download."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dims = dict(QWEN2_1_5B) if shape == "qwen2-1.5b" else dict(QWEN2_1_5B, hidden_size=64, intermediate_size=128,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               vocab_size=1000)  # "tiny": for tests
    tok = char_tokenizer()
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()  # initialised on the GPU where there is one: seconds, not a minute on CPU
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen2ForCausalLM(Qwen2Config(**dims, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    del model
    if cuda:  # this process stays alive while the measured ones run: give the memory back
        torch.cuda.empty_cache()
    return str(folder)
