"""SmolLM2-135M on an easy setting (2x1-digit products, where it is right about half the time): reward must rise.

Minutes on a 2-core CPU, so it is marked slow: `make test-slow`.
"""

import json

import pytest

from tokeneff import make_config, train


@pytest.mark.slow
def test_smollm2_tspmo_raises_reward_on_easy_multiplication(tmp_path):
    cfg = make_config("embedded", overrides=dict(algo="tspmo", task="multiplication", digits_a=2, digits_b=1,
                                                 steps=16, lr=5e-4, group_size=6, prompts_per_step=3,
                                                 eval_at_start=False, eval_limit=8, out=str(tmp_path / "r")))
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert sum(rewards[-6:]) / 6 > sum(rewards[:6]) / 6, rewards
