"""SVAMP (Patel et al., 2021): 1000 one-to-two step arithmetic word problems, MIT licence.

No public list of the usual 300 test IDs exists, so we ship a fixed, seeded 700/300 split by ID
(`splits/svamp_test_ids.txt`): same sizes as the common split, not guaranteed identical. A validation split of
150 of the 700 training problems (`splits/svamp_val_ids.txt`, seeded) is where settings are chosen; RL trains on
the other 550.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from .base import Problem, Task, check_split, format_number

SPLIT_SEED = 20250429  # arXiv v1 date of the paper; only used to (re)create the committed ID lists
N_VAL = 150
REQUIRED = ("ID", "Body", "Question", "Answer")


def default_dir() -> Path:
    env = os.environ.get("TOKENEFF_SVAMP_DIR")
    return Path(env) if env else Path(str(resources.files("tokeneff.tasks") / "data" / "svamp"))


def make_test_ids(ids: list[str], n_test: int = 300, seed: int = SPLIT_SEED) -> list[str]:
    rng = random.Random(seed)
    order = sorted(ids, key=lambda s: int(s.split("-")[-1]))
    return sorted(rng.sample(order, n_test), key=lambda s: int(s.split("-")[-1]))


def make_val_ids(ids: list[str], test_ids: list[str], n_val: int = N_VAL, seed: int = SPLIT_SEED + 1) -> list[str]:
    """The validation IDs: a seeded sample of the non-test IDs (how splits/svamp_val_ids.txt was made)."""
    held = set(test_ids)
    return make_test_ids([i for i in ids if i not in held], n_val, seed)


@lru_cache(maxsize=4)
def load_svamp(path: str) -> tuple[Problem, ...]:
    """Read SVAMP.json with a one-line error for each way the file can be wrong."""
    file = Path(path) / "SVAMP.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(f"SVAMP file {str(file)!r} not found (set svamp_dir or TOKENEFF_SVAMP_DIR)")
    try:
        records = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"SVAMP file {str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(records, list) or not records:
        raise ConfigError(f"SVAMP file {str(file)!r} must hold a non-empty list of problems")
    out, first_at = [], {}
    for i, r in enumerate(records):
        missing = [k for k in REQUIRED if not isinstance(r, dict) or k not in r]
        if missing:
            raise ConfigError(f"SVAMP file {str(file)!r}: record {i} lacks field {missing[0]!r}")
        try:
            answer = float(r["Answer"])
        except (TypeError, ValueError):
            raise ConfigError(f"SVAMP file {str(file)!r}: record {r['ID']!r} has non-numeric "
                              f"Answer {r['Answer']!r}") from None
        if not math.isfinite(answer):
            raise ConfigError(f"SVAMP file {str(file)!r}: record {r['ID']!r} has non-finite Answer {r['Answer']!r}")
        if str(r["ID"]) in first_at:
            raise ConfigError(f"SVAMP file {str(file)!r}: ID {str(r['ID'])!r} appears twice (records "
                              f"{first_at[str(r['ID'])]} and {i})")
        first_at[str(r["ID"])] = i
        body, question = str(r["Body"]).strip(), str(r["Question"]).strip()
        out.append(Problem(id=str(r["ID"]), question=f"{body} {question}", answer=answer))
    return tuple(out)


def load_mawps_asdiv(path: Path) -> list[Problem]:
    """The SVAMP authors' MAWPS + ASDiv-A training fold, numbers unmasked (number0 -> 56)."""
    file = path / "mawps-asdiv-a_svamp" / "train.csv"
    if not file.is_file():
        raise ConfigError(f"extra_train needs {str(file)!r}, which was not found")
    out = []
    with file.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            nums = row["Numbers"].split()
            text = re.sub(r"number(\d+)", lambda m, nums=nums: format_number(float(nums[int(m.group(1))])),
                          row["Question"])
            text = re.sub(r"\s+([.,?!])", r"\1", text)
            out.append(Problem(id=f"mawps-asdiv-{i}", question=text[0].upper() + text[1:],
                               answer=float(row["Answer"])))
    return out


class SVAMP(Task):
    name = "svamp"
    instruction = "Solve the math word problem. Write the calculation, then 'The answer is N.'"
    # Written for this project (not SVAMP problems), in the format the reward reads.
    shots = (
        ("Tom had 24 apples. He gave 9 apples to his friend. How many apples does Tom have now?",
         "24 - 9 = 15. The answer is 15."),
        ("A box holds 6 rows of 7 eggs. How many eggs are in the box?",
         "6 * 7 = 42. The answer is 42."),
        ("Sara shares 36 stickers equally among 4 friends. How many stickers does each friend get?",
         "36 / 4 = 9. The answer is 9."),
        ("A shelf has 18 red books and 25 blue books. How many books are on the shelf?",
         "18 + 25 = 43. The answer is 43."),
    )

    def __init__(self, num_shots: int = 2, svamp_dir: str = "", extra_train: bool = False):
        super().__init__(num_shots)
        self.dir = Path(svamp_dir) if svamp_dir else default_dir()
        self.extra_train = extra_train

    def problems(self, split: str) -> list[Problem]:
        check_split(split, ("train", "val", "test"))
        allp = load_svamp(str(self.dir))
        held = {"test": set(shipped_ids("test")), "val": set(shipped_ids("val"))}
        chosen = ([p for p in allp if p.id in held[split]] if split in held
                  else [p for p in allp if p.id not in held["test"] and p.id not in held["val"]])
        if not chosen:
            file = self.dir / "SVAMP.json" if self.dir.is_dir() else self.dir
            which = "none of its IDs is" if split in held else "all of its IDs are"
            raise ConfigError(f"SVAMP file {str(file)!r}: the {split} split is empty ({which} in the shipped ID "
                              "lists tokeneff/tasks/splits/svamp_{test,val}_ids.txt, which fix the splits)")
        return chosen + load_mawps_asdiv(self.dir) if split == "train" and self.extra_train else chosen


def shipped_ids(split: str) -> list[str]:
    """The committed ID list of SVAMP's held-out split `split` (test or val)."""
    text = (resources.files("tokeneff.tasks") / "splits" / f"svamp_{split}_ids.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def shipped_test_ids() -> list[str]:
    return shipped_ids("test")
