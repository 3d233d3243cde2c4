"""Plumbing: atomic writes, seeding, threads, the memory reading."""

from __future__ import annotations

import errno
import json
import os
import platform
import random
import resource
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_permissions(folder: str | Path) -> None:
    """Give the files a library wrote into `folder` the permissions an ordinary write would (0666 less the umask):
    safetensors writes 0600, so a collaborator could not read an adapter."""
    mode = 0o666 & ~_umask()
    for p in Path(folder).iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file. The file gets the
    permissions an ordinary write would (0666 less the umask), not mkstemp's 0600: a collaborator can read it."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):  # a FIFO, a device, a folder: never replaced
        raise IsADirectoryError(errno.EISDIR if path.is_dir() else errno.EEXIST,
                                "exists and is not a regular file: not replaced", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def environment(threads: int | None = None) -> dict[str, Any]:
    """What decides a run's numbers beside its config and seed: CPU model, the instruction set torch dispatches to
    (its CPU capability), thread count, and the versions of the libraries that compute it. Written beside every
    result (results/<tier>/<experiment>_environment.json) and shown in summary.md. threads: the intra-op threads of
    each run (config `threads`; default: this process's)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # torch < 2.1
        capability = None
    return dict(cpu=cpu, cpu_capability=capability, cores=os.cpu_count(),
                threads=threads if threads is not None else torch.get_num_threads(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                python=platform.python_version(), platform=platform.platform(), versions=versions)


def describe_environment(env: dict[str, Any]) -> str:
    """One line of `environment()`'s record, for summary.md."""
    v = env.get("versions", {})
    libs = ", ".join(f"{k} {x}" for k, x in v.items() if x)
    gpu = f", GPU {env['cuda']}" if env.get("cuda") else ""
    return (f"{env.get('cpu')} (torch CPU capability {env.get('cpu_capability')}, {env.get('cores')} cores, "
            f"{env.get('threads')} intra-op thread(s) per run){gpu}; Python {env.get('python')}, "
            f"{libs}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(n: int = 0) -> int:
    """Set PyTorch's CPU intra-op threads; 0 picks the measured default, 1.

    Measured on the 2-core machine this project is developed on (README, "CPU threads"): one thread per
    process was never slower than two when the machine was otherwise idle and several times faster under any
    load, because OpenMP's spinning threads collapse when another process wants a core. Parallelism comes
    from running independent runs side by side (analysis.grid.run_grid), not from threads inside one run.
    """
    n = n or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def memory_mb(peak: bool = False, device: torch.device | None = None) -> float:
    """The project's one memory reading (training's peak_memory_mb and every benchmark), so that numbers compare.
    CUDA (`device` a CUDA device, or None on a machine with a GPU): memory allocated by tensors; peak: the maximum
    since the last reset. CPU: this process's resident set size; peak: its high-water mark (ru_maxrss)."""
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**20
    if peak:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB elsewhere
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
