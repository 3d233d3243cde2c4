"""`tokeneff train | evaluate | warmstart | bench` (also `python -m tokeneff`): user mistakes print one line and exit 2,
never a traceback; `tokeneff` alone prints the usage and the commands (to stderr) and exits 2; `tokeneff --version`."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from . import __version__, loaded
from .benchmarks.bench import bench_cli
from .benchmarks.decode_limit import BACKEND_SPECS, decode_limit, parse_backends
from .config import ALGOS, GEMMS, PROFILES, TASKS, make_config, parse_overrides
from .errors import TokeneffError, clip
from .evaluate import evaluate
from .loop import install_sigterm_handler, train
from .rundir import check_out_folder
from .warmstart import build_warm_start, describe_adapter, make_warmstart_config, name_for, recipe_hash


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one bounded line, exit 2
        self.exit(2, f"tokeneff: error: {clip(' '.join(message.split()), 500)}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tokeneff", description="Token-efficient RL (S-GRPO, T-SPMO, GRPO) with LoRA.")
    p.add_argument("--version", action="version", version=f"tokeneff {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a LoRA adapter with RL")
    t.add_argument("--algo", choices=ALGOS)
    t.add_argument("--task", choices=TASKS)
    t.add_argument("--model", help="smollm2-135m | tiny-random | hub id | local path")
    t.add_argument("--steps", type=int)
    t.add_argument("--out", help="run directory")
    t.add_argument("--seed", type=int)
    t.add_argument("--profile", choices=PROFILES, default="embedded")
    t.add_argument("--config", help="YAML or JSON file of config keys")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--overwrite", action="store_true", help="delete what --out holds and start over")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="any config field, e.g. beta=0")

    e = sub.add_parser("evaluate", help="greedy accuracy on held-out problems")
    e.add_argument("--task", choices=TASKS, default="svamp")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--adapter", help="a run's adapter/ folder")
    e.add_argument("--split", choices=("train", "val", "test"), default="test")
    e.add_argument("--limit", type=int, default=0, help="first N problems (0: all)")
    e.add_argument("--profile", choices=PROFILES, default="embedded")
    e.add_argument("--out", required=True, help="JSON file for accuracy and every completion")
    e.add_argument("overrides", nargs="*", metavar="key=value")

    w = sub.add_parser("warmstart", help="supervised warm start: LoRA SFT on MAWPS + ASDiv-A, merged and cached")
    w.add_argument("--model", help="base model (default smollm2-135m), or a warm-start name to build its recipe, "
                                   "e.g. smollm2-135m+sftmul")
    w.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe field, e.g. max_examples=64 lr=2e-4 (see tokeneff.warmstart.WarmStartConfig)")
    w.add_argument("--adapters", help="folder of trained adapters (e.g. results/embedded-full/warmstarts): where it "
                                      "holds this recipe's, merge it instead of training; after a build, copy the "
                                      "new adapter there")

    b = sub.add_parser("bench", help="peak memory and step time per algorithm")
    b.add_argument("--model", default="tiny-random")
    b.add_argument("--shape", choices=("qwen2-1.5b",), help="random-weight model of this shape (GPU)")
    b.add_argument("--completion-lens", default="64", help="comma-separated, e.g. 256,512,1024")
    b.add_argument("--group-sizes", default="8", help="comma-separated, e.g. 8,16")
    b.add_argument("--vocab-size", type=int, default=151936, help="tiny-random's vocabulary (Qwen2's)")
    b.add_argument("--vs-trl", action="store_true",
                   help="whole training steps (SVAMP prompts) of TRL's GRPOTrainer and ours at the same settings")
    b.add_argument("--max-new-tokens", type=int, default=96, help="--vs-trl: completion length cap")
    b.add_argument("--steps", type=int, default=3, help="--vs-trl: steps per side (the first is warm-up)")
    b.add_argument("--no-trl-trainers", action="store_true",
                   help="--vs-trl: skip our SGRPOTrainer/TSPMOTrainer inside TRL (two sides fewer)")
    b.add_argument("--algos", default=",".join(ALGOS),
                   help="--vs-trl: our algorithms to compare with TRL, comma-separated (default: all three)")
    b.add_argument("--gemm", choices=GEMMS, default="auto",
                   help="--vs-trl: our side's linear-layer products (rollout_gemm and train_gemm); torch: TRL's own, "
                        "like for like (auto: oneDNN on a CPU)")
    b.add_argument("--gradient-checkpointing", action="store_true")
    b.add_argument("--ladder", action="store_true",
                   help="also the naive full-logits step and each saving in turn (where the memory goes)")
    b.add_argument("--no-rollout", action="store_true", help="skip the rollout tokens/s measurement")
    b.add_argument("--decode-limit", action="store_true",
                   help="only: one decode step of --model (default here: smollm2-135m) against this machine's "
                        "measured GEMM rate on the step's shapes, 1 thread")
    b.add_argument("--backends", default="sliced",
                   help="--decode-limit: rollout backends side by side, comma-separated, from "
                        f"{','.join(BACKEND_SPECS)}")
    b.add_argument("--eval-limit", type=int, default=0,
                   help="--decode-limit: also time a greedy evaluation of this many test problems per backend")
    b.add_argument("--task", choices=TASKS, default="multiplication", help="--decode-limit --eval-limit: the task")
    b.add_argument("--lora", action="store_true",
                   help="--decode-limit: the model under a fresh LoRA adapter (the embedded profile's), as runs sample")
    b.add_argument("--name", default="", help="suffix of the output files, e.g. growth")
    b.add_argument("--out", default="results/benchmarks")
    return p


def main(argv: list[str] | None = None) -> int:
    loaded()  # the imports are done: a Ctrl-C from here on is handled below (one line, a checkpoint)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:  # no command: the usage and the list of commands, not argparse's one-line error
        parser.print_help(sys.stderr)
        return 2
    _no_repeats(parser, argv)
    args, extra = parser.parse_known_args(argv)
    # key=value anywhere: argparse takes the positional overrides only as one run, before or after the options
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        if args.command == "train":
            over = parse_overrides(args.overrides)
            for k in ("algo", "task", "model", "steps", "out", "seed"):
                if getattr(args, k) is not None:
                    _no_collision(over, k, getattr(args, k))
                    over[k] = getattr(args, k)
            cfg = make_config(args.profile, args.config, over)
            install_sigterm_handler()
            final = train(cfg, resume=args.resume, overwrite=args.overwrite)
            if os.environ.get("RANK", "0") == "0":  # one line, not one per data-parallel rank
                print(f"done: {final['steps_done']} steps; held-out accuracy {final['base_accuracy']} -> "
                      f"{final['final_accuracy']}; results in {cfg.out}")
        elif args.command == "evaluate":
            over = parse_overrides(args.overrides)
            for k, flag in (("task", "--task"), ("model", "--model"), ("profile", "--profile"),
                            ("eval_limit", "--limit"), ("out", "--out")):
                if k in over:
                    raise TokeneffError(f"override '{k}={over[k]}' collides with evaluate's {flag}: use {flag}")
            res = evaluate(task=args.task, model=args.model, adapter=args.adapter, split=args.split,
                           limit=args.limit, out=args.out, profile=args.profile, **over)
            print(f"{res['task']} {args.split}: accuracy {res['accuracy']:.3f} on {res['n']} problems -> {args.out}")
        elif args.command == "warmstart":
            over: dict[str, str] = {}
            for item in args.overrides:
                if "=" not in item:
                    raise TokeneffError(f"override {clip(item, 100)!r}: expected key=value")
                k, v = item.split("=", 1)
                if over.get(k, v) != v:
                    raise TokeneffError(f"override {clip(k, 100)}= is given twice ({clip(over[k], 100)!r} and "
                                        f"{clip(v, 100)!r}): give it once")
                over[k] = v
            if args.model is not None:
                _no_collision(over, "model", args.model)
                over["model"] = args.model
            ws = make_warmstart_config(over)
            install_sigterm_handler()  # a polite kill cleans up the unfinished build's temporary folder, as Ctrl-C
            path = build_warm_start(ws, adapters=args.adapters)
            use = name_for(ws) or str(path)
            print(f"warm start: {path}\nrecipe hash: {recipe_hash(ws)}; train or evaluate it as model={use}")
            print(describe_adapter(path, args.adapters))
        elif args.command == "bench":
            args.out = str(check_out_folder(args.out))  # before the compute; `~` expanded once, here
            if args.decode_limit:
                model = "smollm2-135m" if args.model == "tiny-random" else args.model
                if args.eval_limit < 0:
                    raise TokeneffError(f"--eval-limit {args.eval_limit}: must not be negative")
                for r in decode_limit(model, out=args.out, backends=parse_backends(args.backends),
                                      eval_limit=args.eval_limit, eval_task=args.task, adapter=args.lora):
                    if r.get("kind") == "eval":
                        print(f"{r['model']} {r['backend']:<15} greedy evaluation of {r['n']} {r['task']} problems: "
                              f"{r['eval_seconds']:.1f} s, accuracy {r['accuracy']:.3f}, {r['flips']} completions "
                              f"differ from {r['flips_vs']}")
                        continue
                    print(f"{r['model']} {r['backend']:<15} batch {r['batch']}, {r['contexts']} contexts "
                          f"({r['context']:.0f} tokens): decode step {r['step_ms']:.0f} ms, "
                          f"machine floor {r['floor_ms']:.0f} ms -> {r['fraction_of_limit']:.0%} of the limit "
                          f"({r['achieved_gflops']:.1f} GFLOP/s, {r['tokens_per_s']:.0f} tokens/s)")
            else:
                bench_cli(args)
    except TokeneffError as e:
        print(f"tokeneff: error: {clip(' '.join(str(e).split()), 2000)}", file=sys.stderr)  # one bounded line
        return 2
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting: no traceback from atexit hooks
        return 128 + getattr(e, "signum", signal.SIGINT)  # 130 after Ctrl-C, 143 after SIGTERM, as the shell's
    except (MemoryError, RuntimeError) as e:  # CPU: "can't allocate memory"; CUDA: torch.OutOfMemoryError
        text = str(e)
        if not (isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text):
            raise
        print(f"tokeneff: error: out of memory ({clip(' '.join(text.split()), 200) or type(e).__name__}): lower "
              "prompts_per_step, group_size, max_new_tokens or micro_batch_size", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a failed read or write the paths above did not name: still one line
        if not (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"):
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip() or type(e).__name__
        print(f"tokeneff: error: {clip(' '.join(f'{why}{where}'.split()), 2000)}", file=sys.stderr)
        return 2
    return 0


def _no_repeats(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """An option given twice with two values (`--algo grpo --algo sgrpo`, two --config files) is refused, as a
    repeated key=value is: argparse would keep the last one silently."""
    seen: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg == "--":
            continue
        name, eq, value = arg.partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            value = nxt if nxt and not nxt.startswith("-") and "=" not in nxt else None
        if value is None:
            continue  # a flag (--resume) or an option missing its value: argparse says so
        if seen.get(name, value) != value:
            parser.error(f"{name} is given twice ({clip(seen[name], 100)!r} and {clip(value, 100)!r}): give it once")
        seen[name] = value


def _no_collision(over: dict, key: str, flag_value) -> None:
    if key in over and str(over[key]) != str(flag_value):
        raise TokeneffError(f"override '{key}={over[key]}' collides with --{key} {flag_value}: give it once")


if __name__ == "__main__":
    sys.exit(main())
