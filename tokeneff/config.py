"""Run configuration: one dataclass, two profiles, strict validation.

Every knob the paper leaves open is a field here with a default chosen in docs/paper.md, marked
[reconstructed] in its comment. Bad values raise `ConfigError` with one line naming the value; the CLI
turns that into exit code 2 without a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .algorithms import ALGORITHMS
from .errors import ConfigError, clip, show

ALGOS = tuple(ALGORITHMS)  # the one list of algorithm names is algorithms.ALGORITHMS
TASKS = ("svamp", "multiplication")
PROFILES = ("embedded", "paper")
BACKENDS = ("sliced", "tokeneff", "hf", "hf-static", "static")  # rollout backends (rollout.sample)
ROLLOUT_DTYPES = ("float32", "bfloat16")  # the weights training rollouts sample with (rollout.sampling_weights)
GEMMS = ("auto", "onednn", "torch")  # the linear layers' products on a CPU (kernels.onednn_linears)
ATTENTIONS = ("auto", "shared-prefix", "sdpa")  # the sliced decode step's attention (tokeneff.attention)
STEPS = ("auto", "fused", "transformers")  # the sliced decode step itself (tokeneff.fused_step)
ANSWER_FORMATS = ("short", "worked")  # multiplication answers (tasks/multiplication.py)
EVAL_SPLITS = ("test", "val")
# Warm starts (warmstart.py) by model-name suffix: `<base><suffix>` loads the base's warm start built with this recipe
# (WarmStartConfig overrides) and is labelled "<base> + SFT warm start<label>". Longest suffix first.
# - +sftmul: worked multiplication, chosen on its validation split (results/pilots/README.md): zero-shot prompts (the
#   warm start has learnt the format), LoRA on attention and MLP (arithmetic facts live in the MLPs), a larger
#   learning rate than SVAMP's.
# - +sftepoch: SVAMP on the whole epoch of MAWPS + ASDiv-A: the full tier's base.
# - +sft: SVAMP on a seeded 1,200 problems (38% of the epoch): the default tier's base, as it fits the hour.
# (Their build times: results/embedded*/warmstart*.json.)
WARM_STARTS: dict[str, tuple[dict[str, Any], str]] = {
    "+sftmul": (dict(task="multiplication", num_shots=0, max_examples=1000, lr=5e-4,
                     lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
                " (worked multiplication)"),
    "+sftepochmlp": (dict(task="svamp", max_examples=0, lr=5e-4,
                          lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
                     " (whole epoch, LoRA on attention + MLP)"),
    "+sftepoch": (dict(task="svamp", max_examples=0), " (whole epoch)"),
    "+sft": (dict(task="svamp"), ""),
}
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MAX_LR = 1.0
MAX_GROUP, MAX_ROWS = 1024, 65536  # group_size, prompts_per_step; completions per update (profiles: tens)
MAX_SEED = 2**32 - 3  # numpy seeds must be < 2**32; the loop also uses seed + 1 and seed + 2
PATH_KEYS = ("out", "svamp_dir")  # `~` is expanded in these (and in a model given as a path)


@dataclass
class LoraSettings:
    """The LoRA adapter, the same fields and checks for RL (`TrainConfig`) and the SFT warm start
    (`warmstart.WarmStartConfig`)."""

    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"

    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in str(self.lora_targets).split(",") if t.strip()]

    def check_lora(self) -> None:
        for name in ("lora_r", "lora_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r}: must be a positive integer")
        d = self.lora_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise ConfigError(f"lora_dropout={d!r}: must be in [0, 1)")
        if not self.lora_target_list():
            raise ConfigError(f"lora_targets={show(self.lora_targets)}: name at least one module, e.g. q_proj,v_proj")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.lora_target_list(), task_type="CAUSAL_LM")


@dataclass
class TrainConfig(LoraSettings):
    # --- run ---
    algo: str = "sgrpo"
    """grpo (all tokens) | sgrpo (stochastic subset) | tspmo (prefix-matched pivotal tokens)"""
    task: str = "svamp"
    """svamp | multiplication"""
    model: str = "smollm2-135m"
    """built-in name (smollm2-135m, tiny-random), Hugging Face hub id, or local path"""
    profile: str = "embedded"
    """embedded (offline CPU, small) | paper (Qwen2-1.5B on a GPU, the paper's settings)"""
    steps: int = 40
    """number of policy updates"""
    seed: int = 0
    out: str = "runs/default"
    """run directory: metrics.jsonl, config.json, adapter/, checkpoint/"""
    threads: int = 0
    """CPU intra-op threads (0: auto = 1; see utils.set_threads for the measurement behind it); unused on a GPU"""

    # --- task ---
    svamp_dir: str = ""
    """SVAMP folder (SVAMP.json); empty: $TOKENEFF_SVAMP_DIR or the copy shipped in the package"""
    extra_train: bool = False
    """add the 3,138 MAWPS + ASDiv-A problems to SVAMP's 700 training problems"""
    digits_a: int = 3
    """multiplication: digits of the first factor [reconstructed: 3 x 3]"""
    digits_b: int = 3
    """multiplication: digits of the second factor"""
    num_shots: int = 2
    """worked examples shown as earlier chat turns (0 = zero-shot)"""
    answer_format: str = "short"
    """multiplication: short (one line, "47 * 38 = 1786. ...") | worked (partial products and their sum; the
    answers of ~60 tokens where replay and token selection can act) [reconstructed: the paper's model writes its
    own reasoning]"""

    # --- rollout ---
    group_size: int = 8
    """G: completions sampled per prompt"""
    prompts_per_step: int = 4
    """prompts per update; all prompts x G completions are generated in one batch"""
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_p: float = 1.0
    rollout_backend: str = "sliced"
    """sliced (our loop on a preallocated KV cache and mask: the prompt KV shared by its group, each step attending
    only up to the length so far, finished rows leaving the batch at their EOS, draws by inverse CDF) | tokeneff (the
    same loop on a cache grown by concatenation, draws by torch.multinomial: the default before 2026-12) | static
    (fixed shapes for torch.compile and CUDA graphs; finished rows leave when the running ones halve) | hf
    (transformers generate, shared prompt KV) | hf-static (generate with a static KV cache: compiled, CUDA graphs on
    a GPU)"""
    rollout_compile: bool = False
    """static backend: its decode step under torch.compile (inductor; CUDA graphs on a GPU). Compiling costs minutes
    and did not speed up a 1-thread CPU step (docs/memory-and-speed.md)"""
    rollout_merge_lora: bool = False
    """sliced and static backends: sample with the LoRA update merged into a copy of the adapted weights (one matrix
    product per layer instead of three; the originals are put back untouched): no saving measurable on a CPU
    (docs/memory-and-speed.md)"""
    rollout_dtype: str = "float32"
    """sliced and static backends: float32 | bfloat16: training rollouts sampled from a bfloat16 copy of the
    LoRA-merged weights while the loss stays in the model's own precision. A CPU with AVX-512 BF16 decodes ~2.5x
    faster, from a slightly different policy than the one trained (log-probs differ by the bfloat16 rounding,
    scripts/bf16_rollout_gap.py; nothing corrects for it). Evaluation always runs the model's own weights."""
    rollout_gemm: str = "auto"
    """sliced and static backends: the linear layers' matrix products while sampling (rollouts and evaluation):
    onednn (oneDNN's kernel on weights packed once into its blocked layout: a second copy of them, kept while they
    live) | torch (torch's own: MKL's sgemm for float32 on a CPU, cuBLAS on a GPU) | auto: onednn for sliced on a
    CPU, torch otherwise (static keeps what its committed runs used). Both are float32 arithmetic summed in other
    orders; on an AMD CPU MKL takes a generic path and oneDNN decodes ~2x faster (docs/memory-and-speed.md)."""
    rollout_attention: str = "auto"
    """sliced backend: the decode step's attention (rollouts and evaluation): shared-prefix (the tokens every prompt
    of the batch starts with, its instruction and worked examples, are kept once in the KV cache and attended by one
    product for all rows) | sdpa (that prefix repeated in every row, torch's scaled_dot_product_attention, as
    transformers runs it) | auto: shared-prefix on a CPU (1.1x per step on the embedded prompts), sdpa on a GPU (not
    measured there).
    Both are float32 attention summed in other orders (docs/memory-and-speed.md)."""
    rollout_step: str = "auto"
    """sliced backend: the decode step (rollouts and evaluation): fused (one function over the layers, q/k/v and
    gate/up each one product on stacked weights, LoRA's update beside them: tokeneff.fused_step; Llama and Qwen2
    models) | transformers (the model's forward, peft's LoRA layers) | auto: fused on a CPU where the model is one
    it knows, transformers otherwise (a GPU: not measured there). The same float32 operations: bit for bit the same
    logits at SmolLM2-135M's shapes on a CPU (docs/memory-and-speed.md)."""

    # --- algorithm ---
    sgrpo_alpha: int = 25
    """S-GRPO: the first alpha completion tokens are always kept [reconstructed]"""
    sgrpo_p: float = 0.5
    """S-GRPO: keep probability for later tokens [reconstructed]"""
    sgrpo_k: int = 100
    """S-GRPO: at most k tokens per completion [reconstructed]"""
    beta: float = 0.04
    """KL weight (k3 estimator on the selected tokens); 0 skips the reference forward [reconstructed]"""
    log_kl: bool = True
    """also compute and log the KL to the reference when beta = 0 (one extra forward, no backward)"""
    adv_eps: float = 1e-4
    """epsilon in (r - mean) / (std + eps)"""
    replay: str = "auto"
    """T-SPMO replay-based resampling: on | off | auto (on for multiplication, off for svamp); see
    algorithms/tspmo.py (ReplaySampler, replay_on)"""
    replay_fraction: float = 0.5
    """share of a step's groups started from a cut successful completion, once the buffer has one"""
    replay_buffer_size: int = 256

    # --- optimisation ---
    lr: float = 2e-5
    """AdamW learning rate [reconstructed: 1e-5 ... 5e-5]"""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 16
    """sequences per forward/backward; a step accumulates gradients over its micro-batches"""
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    """no | bf16 | fp16 (accelerate)"""
    lm_head_tile: int = 8192
    """vocabulary columns per tile of the chunked LM head (TRL's kernel; smaller = less memory, more passes)"""
    train_gemm: str = "auto"
    """the loss's forward and backward through the frozen linear layers: onednn (oneDNN's kernel on the weight and its
    transpose packed: two more copies of the frozen weights, kept while they live; LoRA's own layers keep torch's) |
    torch | auto: onednn on a CPU, torch on a GPU. float32 either way (under mixed_precision, autocast's products);
    ~2x faster products on an AMD CPU (docs/memory-and-speed.md). Runs before 2026-12-01 trained with torch's."""
    # LoRA: lora_r, lora_alpha, lora_dropout, lora_targets (LoraSettings)

    # --- evaluation and checkpoints ---
    eval_every: int = 0
    """evaluate on held-out problems every N steps (0: only at the start and the end)"""
    eval_at_start: bool = True
    """evaluate the base model at step 0 (experiment grids do it once per task instead)"""
    eval_limit: int = 0
    """held-out problems per evaluation (0: all)"""
    eval_split: str = "test"
    """test | val: the split evaluated during training; pilots choose settings on val, final grids report test"""
    eval_batch_size: int = 32
    eval_max_new_tokens: int = 0
    """0: same as max_new_tokens"""
    save_every: int = 10
    """checkpoint (adapter, optimiser, RNG, step) every N steps"""
    max_bad_steps: int = 5
    """stop after this many non-finite losses in a row"""

    def validate(self) -> TrainConfig:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}={show(getattr(self, name))}: {why}")

        choices = {"algo": ALGOS, "task": TASKS, "profile": PROFILES,
                   "replay": ("on", "off", "auto"), "mixed_precision": ("no", "bf16", "fp16"),
                   "rollout_backend": BACKENDS, "rollout_dtype": ROLLOUT_DTYPES, "rollout_gemm": GEMMS,
                   "rollout_attention": ATTENTIONS, "rollout_step": STEPS, "train_gemm": GEMMS,
                   "answer_format": ANSWER_FORMATS, "eval_split": EVAL_SPLITS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}")
        for name in ("rollout_compile", "rollout_merge_lora"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        # these backends' own options, and the values that mean what every other backend does anyway
        own = dict(rollout_compile=(("static",), (False,)), rollout_merge_lora=(("static", "sliced"), (False,)),
                   rollout_dtype=(("static", "sliced"), ("float32",)),
                   rollout_gemm=(("static", "sliced"), ("auto", "torch")),
                   rollout_attention=(("sliced",), ("auto", "sdpa")),
                   rollout_step=(("sliced",), ("auto", "transformers")))
        for name, (backends, neutral) in own.items():
            if getattr(self, name) not in neutral and self.rollout_backend not in backends:
                raise bad(name, f"applies to rollout_backend={' or '.join(backends)} only (it is "
                                f"{self.rollout_backend!r})")
        if not isinstance(self.model, str) or not self.model.strip():
            raise bad("model", "must be a built-in name, a hub id or a local path")
        positive = ("steps", "group_size", "prompts_per_step", "max_new_tokens", "sgrpo_k",
                    "replay_buffer_size", "micro_batch_size", "lm_head_tile", "eval_batch_size", "save_every",
                    "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        if self.group_size < 2:
            raise bad("group_size", "must be at least 2: advantages compare completions within a group")
        for name in ("group_size", "prompts_per_step"):  # bounds, not a hang: 10**8 rows would allocate until killed
            if getattr(self, name) > MAX_GROUP:
                raise bad(name, f"must be at most {MAX_GROUP}")
        rows = self.group_size * self.prompts_per_step
        if rows > MAX_ROWS:
            raise bad("prompts_per_step", f"times group_size={self.group_size} is {rows} completions per update: at "
                      f"most {MAX_ROWS}")
        for name in ("lr", "temperature", "adv_eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise bad(name, "must be a positive number")
        # past these the sampler's softmax overflows (temperature) or the first update destroys the model (lr)
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE:g} "
                                     "(held-out evaluation is greedy already)")
        if self.lr > MAX_LR:
            raise bad("lr", f"must be at most {MAX_LR:g} (LoRA learning rates are around 1e-5 to 1e-3)")
        if self.seed > MAX_SEED:
            raise bad("seed", f"must be at most {MAX_SEED} (numpy's seed range, less the two derived seeds)")
        for name in ("digits_a", "digits_b"):
            if not 1 <= getattr(self, name) <= 12:
                raise bad(name, "must be between 1 and 12")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.sgrpo_p <= 1:
            raise bad("sgrpo_p", "must be a probability in [0, 1]")
        if not 0 <= self.sgrpo_alpha <= self.sgrpo_k:
            raise bad("sgrpo_alpha", f"must be between 0 and sgrpo_k={self.sgrpo_k}")
        if not 0 <= self.replay_fraction <= 1:
            raise bad("replay_fraction", "must be in [0, 1]")
        for name in ("beta", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise bad(name, "must be a non-negative number")
        if self.lr * self.weight_decay >= 1:  # AdamW scales the weights by 1 - lr * weight_decay every step
            raise bad("weight_decay", f"lr * weight_decay must be below 1 (lr={self.lr:g})")
        for name in ("seed", "threads", "num_shots", "eval_every", "eval_limit", "eval_max_new_tokens"):
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        cores = os.cpu_count() or 1
        if self.threads > cores:  # more only slows down; 10**8 crashed OpenMP (a segfault, no message)
            raise bad("threads", f"must be at most this machine's {cores} CPUs (0: one thread, measured best here)")
        if self.answer_format != "short" and self.task != "multiplication":
            raise bad("answer_format", f"worked answers are generated for the multiplication task only (task="
                                       f"{self.task!r}: leave answer_format=short)")
        self.check_lora()
        if not str(self.out).strip():
            raise bad("out", "must be a directory path")
        return self

    def rollout_options(self, evaluation: bool = False) -> dict[str, Any]:
        """`rollout.sample`'s backend keywords; an evaluation samples the model's own weights (no rollout_dtype)."""
        return dict(backend=self.rollout_backend, compile=self.rollout_compile, merge_lora=self.rollout_merge_lora,
                    dtype="float32" if evaluation else self.rollout_dtype, gemm=self.rollout_gemm,
                    attention=self.rollout_attention, step=self.rollout_step)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Profile defaults: applied first, then the config file, then key=value overrides.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    # The paper's settings (docs/paper.md): Qwen2-1.5B-Instruct, G=8, 200 new tokens, a few hundred updates.
    "paper": dict(model="Qwen/Qwen2-1.5B-Instruct", steps=300, group_size=8, prompts_per_step=4,
                  max_new_tokens=200, lr=2e-5, mixed_precision="bf16", gradient_checkpointing=True,
                  eval_every=25, eval_batch_size=64, micro_batch_size=32),
    # Sized for a 2-core CPU: SmolLM2-135M, short answers (its few-shot answers are one line),
    # several prompts per step so that some groups have reward variance, a larger LoRA learning rate.
    # beta=0 skips the reference forward (a third of the step on a CPU); docs/paper.md allows it.
    # On a CPU a decode step costs about the same for 10 or 40 rows (it is bound by reading the weights), so
    # rollouts use many rows per step and evaluations one batch.
    "embedded": dict(model="smollm2-135m", steps=20, group_size=6, prompts_per_step=4, num_shots=1,
                     max_new_tokens=24, sgrpo_alpha=6, sgrpo_k=16, lr=2e-4, beta=0.0, eval_every=0,
                     eval_limit=50, eval_batch_size=50, micro_batch_size=24, digits_a=2, digits_b=1,
                     save_every=5),
}

FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))

# How each field meets a rerun, decided here once per field (tests/test_config.py: every field is listed):
#   r  may change on --resume (the schedule, where files go, speed): not what the updates do
#   m  a finished run's results were measured with it: returning them for another value is refused
#   e  greedy evaluation's outcomes depend on it: the base model's evaluation is cached per these
#   -  none: it changes what training does, so a resume must keep it
FIELD_RULES: dict[str, str] = dict(
    lora_r="-", lora_alpha="-", lora_dropout="-", lora_targets="-", algo="-", task="e", model="e", profile="-",
    steps="r", seed="-", out="r", threads="r", svamp_dir="e", extra_train="-", digits_a="e", digits_b="e",
    num_shots="e", answer_format="e", group_size="-", prompts_per_step="-", max_new_tokens="e", temperature="-",
    top_p="-", rollout_backend="e", rollout_compile="e", rollout_merge_lora="-", rollout_dtype="-", rollout_gemm="e",
    rollout_attention="e", rollout_step="e",
    sgrpo_alpha="-", sgrpo_p="-", sgrpo_k="-", beta="-", log_kl="-", adv_eps="-", replay="-", replay_fraction="-",
    replay_buffer_size="-", lr="-", weight_decay="-", max_grad_norm="-", micro_batch_size="-",
    gradient_checkpointing="-", mixed_precision="-", train_gemm="-",
    lm_head_tile="-", eval_every="rm", eval_at_start="rm", eval_limit="rme", eval_split="me", eval_batch_size="r",
    eval_max_new_tokens="rme", save_every="r", max_bad_steps="r")
RESUMABLE_KEYS = tuple(k for k, v in FIELD_RULES.items() if "r" in v)
RESULT_KEYS = tuple(k for k, v in FIELD_RULES.items() if "m" in v)
EVAL_KEYS = tuple(k for k, v in FIELD_RULES.items() if "e" in v)


def _coerce(name: str, raw: Any) -> Any:
    return coerce(name, raw, getattr(TrainConfig, name, None))


def coerce(name: str, raw: Any, default: Any) -> Any:
    """Convert a CLI/YAML value to the type of the field's default, with a one-line error on failure."""
    kind = type(default) if default is not None else str
    if raw is None:
        raise ConfigError(f"{name}: null is not a value (leave the key out for the default, {default!r})")
    if isinstance(raw, (list, tuple)) and name == "lora_targets" and all(isinstance(x, str) for x in raw):
        raw = ",".join(raw)  # a YAML list of module names
    if isinstance(raw, (list, tuple, dict, set)):
        what = "a mapping" if isinstance(raw, dict) else "a list"
        raise ConfigError(f"{name}={show(raw)}: expected {kind.__name__}, got {what}")
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if re.fullmatch(r"[+-]?\d+", text):  # exact, however long (float() would round 10**23)
                return int(text)
            f = float(text)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{name}={show(raw)}: expected {kind.__name__}") from None
    return text


def unknown_key_error(key: str) -> ConfigError:
    near = difflib.get_close_matches(key[:100], FIELD_NAMES, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"unknown config key {show(key)}{hint}")


def make_config(profile: str = "embedded", file: str | None = None,
                overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Profile defaults <- YAML/JSON file <- overrides; coerced and validated."""
    if profile not in PROFILES:
        raise ConfigError(f"profile={show(profile)}: must be one of {', '.join(PROFILES)}")
    values: dict[str, Any] = dict(PROFILE_DEFAULTS[profile], profile=profile)
    given: dict[str, Any] = dict(load_config_file(file)) if file else {}
    given.update(overrides or {})
    given_profile = given.get("profile", profile)  # str() of a nested YAML alias could be gigabytes: scalars only
    if isinstance(given_profile, (list, tuple, dict, set)) or str(given_profile) != profile:  # chosen before the rest
        where = f"config file {file!r}" if file and "profile" not in (overrides or {}) else "the overrides"
        raise ConfigError(f"profile={show(given['profile'])} in {where} while the profile is {profile!r}: choose "
                          f"it with --profile {show(given['profile'], 40)} (or make_config(profile=...))")
    values.update(given)
    for key in values:
        if not isinstance(key, str):
            raise ConfigError(f"config key {show(key)} is not a name (keys are config fields such as group_size)")
        if key not in FIELD_NAMES:
            raise unknown_key_error(key)
    coerced = {k: _coerce(k, v) for k, v in values.items()}
    for k in PATH_KEYS:
        if isinstance(coerced.get(k), str) and coerced[k].startswith("~"):
            coerced[k] = os.path.expanduser(coerced[k])
    if isinstance(coerced.get("model"), str) and coerced["model"].startswith("~"):
        coerced["model"] = os.path.expanduser(coerced["model"])
    cfg = TrainConfig(**coerced)
    return cfg.validate()


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects: a key given twice is a mistake (which one was meant?), not last-wins."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _yaml_unique(text: str) -> Any:
    """yaml.safe_load, refusing a mapping that gives a key twice (PyYAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        # the mapping's own keys (a key merged in with `<<` may be overridden: that is what merging is for)
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        for i, k in enumerate(keys):
            if k in keys[:i]:
                raise _DuplicateKey(str(k))
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def load_config_file(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"config file {path!r} is a folder: name a YAML or JSON file")
    if p.exists() and not p.is_file():
        raise ConfigError(f"config file {path!r} is not a regular file (a FIFO or device?): name a YAML or JSON file")
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not a text file (expected YAML or JSON)") from None
    if "\x00" in text:
        raise ConfigError(f"config file {path!r} is not a text file (expected YAML or JSON)")
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if p.suffix == ".json" else _yaml_unique(text)
    except _DuplicateKey as e:
        raise ConfigError(f"config file {path!r} gives {clip(str(e), 100)} twice: give each key once") from None
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise ConfigError(f"config file {path!r} could not be parsed: {clip(str(e).splitlines()[0], 200)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of key: value")
    return data


def check_name(what: str, name: str) -> str:
    """A name that becomes one folder or file name (an experiment, a variant, a results folder): never a path, so
    that nothing is written outside the folder it belongs in."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"{what}={show(name)}: must be a plain name (no '/', not '.' or '..'), e.g. mulworked")
    if len(name) > 100:  # file systems take 255 bytes; a run folder adds -s<seed>
        raise ConfigError(f"{what}={show(name)}: {len(name)} characters; at most 100")
    return name


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {show(item)}: expected key=value")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in FIELD_NAMES:
            raise unknown_key_error(k)
        if k in out and out[k] != v:  # as a flag and its key=value: one value, said once
            raise ConfigError(f"override {k}= is given twice ({show(out[k])} and {show(v)}): give it once")
        out[k] = v
    return out
