"""Checks of inputs that only make sense against the machine, the model or the files: one line each
(TokeneffError, exit code 2 from the CLI), run before the expensive part."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from .algorithms.tspmo import replay_on
from .errors import TokeneffError, show
from .models import BUILTIN, cache_dir
from .rollout import build_prompt, encode_prompts
from .rundir import check_writable


def check_precision(mixed_precision: str) -> None:
    """fp16 needs a GPU; bf16 on a GPU needs one that supports it."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TokeneffError("mixed_precision='fp16': needs a CUDA GPU and none is available; use no or bf16")
    if mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise TokeneffError(f"mixed_precision='bf16': {torch.cuda.get_device_name()} does not support bfloat16; "
                            "use fp16 or no")


def _safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file cannot be complete, or None: its header declares where the last tensor ends."""
    if not file.is_file():
        return f"{file.name} is not a regular file (a folder or FIFO?)"  # a FIFO would block the read below
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{file.name} is truncated ({size} bytes)"
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                return f"{file.name} is truncated ({size:,} bytes, its header alone needs {n + 8:,})"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError):
        return f"{file.name} is not a valid safetensors file (its header is damaged)"
    if size < 8 + n + end:
        return f"{file.name} is truncated ({size:,} of {8 + n + end:,} bytes)"
    return None


def check_model_path(name: str) -> None:
    """A local model folder must look loadable: config.json and complete safetensors weights."""
    if name in ("smollm2-135m", "tiny-random"):
        return check_cache(name)
    p = Path(name).expanduser()
    if not p.exists():
        if "/" not in name or name.startswith((".", "/", "~")):  # not a hub id (org/name) either
            raise TokeneffError(f"model={name!r}: not a built-in name ({', '.join(BUILTIN)}), an existing local "
                                "path, or a hub id like Qwen/Qwen2-1.5B-Instruct")
        return None  # a hub id: models.load_model says whether it loads
    if p.is_file():
        raise TokeneffError(f"model={name!r} is a file: pass the model's folder (config.json, *.safetensors, "
                            "tokenizer)")
    if not any(p.iterdir()):
        raise TokeneffError(f"model={name!r}: the folder is empty")
    if (p / "config.json").exists() and not (p / "config.json").is_file():
        raise TokeneffError(f"model={name!r}: its config.json is not a regular file (a folder or FIFO?)")
    if not (p / "config.json").is_file():
        raise TokeneffError(f"model={name!r}: no config.json in the folder (not a Hugging Face model folder)")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TokeneffError(f"model={name!r}: {index.name} is not a valid index") from None
        files = [p / s for s in shards]
        for f in files:
            if not f.is_file():
                raise TokeneffError(f"model={name!r}: {index.name} names {f.name!r}, which is missing")
    else:
        files = sorted(p.glob("*.safetensors"))
    if not files:
        other = sorted(x.name for x in p.glob("*.bin"))
        hint = f" ({other[0]} is not loaded: save the model with safetensors)" if other else ""
        raise TokeneffError(f"model={name!r}: no *.safetensors weights in the folder{hint}")
    for f in files:
        why = _safetensors_problem(f)
        if why:
            raise TokeneffError(f"model={name!r}: {why}")
    return None


def check_cache(name: str) -> None:
    """The embedded model is converted once into the cache folder: it must be writable when that is still due.
    (Warm starts are built only by `tokeneff warmstart`, which checks the cache itself.)"""
    if name != "smollm2-135m" or (cache_dir() / "smollm2-135m" / "model.safetensors").is_file():
        return None
    try:
        check_writable(cache_dir(), "cache")
    except TokeneffError as e:
        raise TokeneffError(f"{e} (TOKENEFF_CACHE={os.environ.get('TOKENEFF_CACHE', '')!r}; model=smollm2-135m is "
                            "converted once into it: point TOKENEFF_CACHE to a writable folder)") from None


def check_lora_targets(model: torch.nn.Module, targets: list[str], model_name: str, r: int | None = None) -> None:
    """Each target names linear (or embedding) layers the selective loss trains through; a rank `r` above a targeted
    layer's smaller dimension buys nothing (the update's rank cannot exceed it) and only allocates."""
    found: dict[str, torch.nn.Module] = {}
    for n, m in model.named_modules():
        found.setdefault(n.rsplit(".", 1)[-1], m)
    for t in targets:
        if t == "lm_head":
            raise TokeneffError("lora_targets: 'lm_head' is bypassed by the selective LM head (it reads the head's "
                                "weight directly), so LoRA there would never train; target attention/MLP layers")
        if t not in found:
            raise TokeneffError(f"lora_targets: module {show(t)} is not in {model_name}")
        m = found[t]
        if not (isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) or type(m).__name__ == "Conv1D"):
            raise TokeneffError(f"lora_targets: {show(t)} is a {type(m).__name__}, not a linear layer; LoRA targets "
                                "linear layers such as q_proj,v_proj")
        dim = min(m.weight.shape)
        if r is not None and r > dim:
            raise TokeneffError(f"lora_r={show(r)}: above the smaller dimension ({dim}) of {show(t)} in {model_name}, "
                                "which bounds a LoRA update's rank; use at most that (8 to 64 is usual)")


def check_context(model, tok, task, problems, cfg) -> None:
    """The longest prompt plus the tokens to generate must fit the model's context."""
    ctx = getattr(model.config, "max_position_embeddings", None)
    if not ctx or not problems:
        return
    longest = max(problems, key=lambda p: len(p.question))
    prompt = len(encode_prompts(tok, [build_prompt(tok, task.messages(longest))])[0])
    for name in ("max_new_tokens", "eval_max_new_tokens"):
        v = getattr(cfg, name)
        # with replay, a prompt carries a cut earlier completion (up to max_new_tokens) before the new tokens
        if v and prompt + v * (2 if replay_on(cfg) and name == "max_new_tokens" else 1) > ctx:
            raise TokeneffError(f"{name}={v}: with the longest prompt ({prompt} tokens) it exceeds the model's context "
                                f"of {ctx} tokens (max_position_embeddings)")
