"""Choose a token budget from one greedy evaluation at a large cap: how many answers each smaller cap would cut off.

Greedy decoding is the same up to any cap, so a completion generated with a cap of 200 tokens, cut to its first L
tokens, is exactly what a cap of L gives. One evaluation therefore shows, for every L below its own cap, the share
of answers L truncates and the accuracy it leaves (the answer read from the first L tokens, as an evaluation at L
would read it).
Used on the validation split only (README, "How settings were chosen"):

    python -m tokeneff.analysis.budget results/pilots/svamp_sftepoch_val_200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from ..errors import TokeneffError, clip
from ..models import load_model
from ..tasks.answer import is_correct
from ..warmstart import model_folder

CAPS = (24, 32, 48, 64, 96, 128, 160, 200)


def budget_table(records: list[dict], ids: list[list[int]], decode, cap: int,
                 caps: tuple[int, ...] = CAPS) -> pd.DataFrame:
    """Per cap L <= `cap`: answers cut off (the greedy completion needs L tokens or more, its end-of-turn token
    included; at `cap` itself the evaluation's own flag) and correct ones (the answer read from the first L tokens,
    as the evaluation reads it). `ids`: each completion's tokens; `decode`: tokens -> text."""
    rows = []
    for c in [c for c in caps if c < cap] + [cap]:
        if c == cap:
            cut, right = [r["truncated"] for r in records], [bool(r["correct"]) for r in records]
        else:
            cut = [len(t) >= c for t in ids]
            right = [is_correct(decode(t[:c]), r["reference"]) for r, t in zip(records, ids, strict=True)]
        rows.append(dict(new_tokens=c, truncated=sum(cut), truncated_pct=100 * sum(cut) / len(records),
                         correct=sum(right), accuracy_pct=100 * sum(right) / len(records)))
    return pd.DataFrame(rows)


def completion_ids(records: list[dict], model: str) -> tuple[list[list[int]], object]:
    """Each completion's tokens by the model's own tokenizer (the records keep the text), and its decoder."""
    _, tok = load_model(model_folder(model))
    ids = [tok(r["completion"], add_special_tokens=False)["input_ids"] for r in records]
    return ids, lambda t: tok.decode(t, skip_special_tokens=True)


def _read(path: str, model: str | None, cap: int | None) -> tuple[str, int, list[dict]]:
    """The evaluation's records, model and cap, checked: one line for anything else."""
    f = Path(path)
    if not f.is_file():  # a FIFO would block the read
        raise TokeneffError(f"{path!r}: not an evaluation file (missing, or not a regular file)")
    try:
        result = json.loads(f.read_text())
        records = result["records"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise TokeneffError(f"{path!r}: not an evaluation file ({clip(str(e), 200)})") from None
    if not isinstance(records, list) or not records or not all(
            isinstance(r, dict) and isinstance(r.get("completion"), str) and isinstance(r.get("truncated"), bool)
            and isinstance(r.get("correct"), bool) and isinstance(r.get("reference"), (int, float)) for r in records):
        raise TokeneffError(f"{path!r}: its records must be a non-empty list of evaluated completions (completion, "
                            "reference, correct, truncated), as `tokeneff evaluate --out` writes them")
    model = model if model is not None else result.get("model")
    recorded = result.get("max_new_tokens")
    if cap is not None and recorded is not None and cap != recorded:
        raise TokeneffError(f"cap={cap}: the evaluation says it ran at max_new_tokens={clip(repr(recorded), 50)}; a "
                            "smaller cap is read from it, not given: leave --cap out")
    cap = cap if cap is not None else recorded
    if not isinstance(model, str) or not model:
        raise TokeneffError(f"{path!r} does not say its model: pass --model")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise TokeneffError(f"cap={clip(repr(cap), 100)}: must be the evaluation's max_new_tokens, a positive integer "
                            "(pass --cap if the file does not say it)")
    return model, cap, records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokeneff.analysis.budget", description=__doc__.splitlines()[0])
    p.add_argument("evaluation", help="the JSON that `tokeneff evaluate --out` wrote, at a large max_new_tokens")
    p.add_argument("--model", help="the model evaluated, for its tokenizer (default: the file's)")
    p.add_argument("--cap", type=int, help="the max_new_tokens the evaluation ran with (default: the file's)")
    args = p.parse_args(argv)
    try:
        model, cap, records = _read(args.evaluation, args.model, args.cap)
        ids, decode = completion_ids(records, model)
        table = budget_table(records, ids, decode, cap)
    except TokeneffError as e:
        print(f"tokeneff: error: {e}", file=sys.stderr)
        return 2
    print(table.to_markdown(index=False, floatfmt=("g", "g", ".1f", "g", ".1f")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
