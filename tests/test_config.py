import pytest

from tokeneff.algorithms.tspmo import replay_on
from tokeneff.config import make_config, parse_overrides
from tokeneff.errors import ConfigError


def test_profiles_and_overrides():
    cfg = make_config("paper")
    assert cfg.model == "Qwen/Qwen2-1.5B-Instruct" and cfg.group_size == 8 and cfg.sgrpo_alpha == 25
    cfg = make_config("embedded", overrides=parse_overrides(["beta=0", "algo=tspmo", "task=multiplication"]))
    assert cfg.beta == 0.0 and replay_on(cfg)  # replay is on by default for T-SPMO on multiplication
    assert not replay_on(make_config(overrides=dict(algo="tspmo", task="svamp")))


@pytest.mark.parametrize("over, message", [
    (dict(algo="ppo"), "algo='ppo'"),
    (dict(task="gsm8k"), "task='gsm8k'"),
    (dict(steps=0), "steps=0"),
    (dict(steps=-3), "steps=-3"),
    (dict(group_size=1), "group_size=1"),
    (dict(lr=0), "lr=0.0"),
    (dict(lr="-1e-5"), "lr=-1e-05"),
    (dict(sgrpo_p=1.5), "sgrpo_p=1.5"),
    (dict(sgrpo_alpha=500, sgrpo_k=100), "sgrpo_alpha=500"),
    (dict(sgrpo_k=0), "sgrpo_k=0"),
    (dict(digits_a=0), "digits_a=0"),
    (dict(digits_b=13), "digits_b=13"),
    (dict(steps="ten"), "steps='ten': expected int"),
    (dict(seeed=1), "did you mean 'seed'"),
    (dict(group_szie=4), "did you mean 'group_size'"),
])
def test_bad_values_are_named(over, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make_config("embedded", overrides=over)


def test_bad_profile_and_config_file(tmp_path):
    with pytest.raises(ConfigError, match="profile='huge'"):
        make_config("huge")
    f = tmp_path / "c.yaml"
    f.write_text("betta: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        make_config(file=str(f))
    f.write_text("beta: 0.1\nsteps: 7\n")
    assert make_config(file=str(f)).steps == 7
    with pytest.raises(ConfigError, match="does not exist"):
        make_config(file=str(tmp_path / "nope.yaml"))


def test_every_config_field_says_how_it_meets_a_rerun():
    """A new TrainConfig field must be classified once (config.FIELD_RULES): may a resume change it, were a finished
    run's results measured with it, does greedy evaluation depend on it."""
    from tokeneff.config import EVAL_KEYS, FIELD_NAMES, FIELD_RULES, RESULT_KEYS, RESUMABLE_KEYS

    assert sorted(FIELD_RULES) == sorted(FIELD_NAMES)
    assert all(v == "-" or set(v) <= set("rme") for v in FIELD_RULES.values())
    assert "steps" in RESUMABLE_KEYS and "lr" not in RESUMABLE_KEYS and "algo" not in RESUMABLE_KEYS
    assert "eval_split" in RESULT_KEYS and "eval_split" not in RESUMABLE_KEYS  # another split is another result
    assert {"model", "task", "max_new_tokens", "eval_max_new_tokens", "eval_split"} <= set(EVAL_KEYS)
    assert "lr" not in EVAL_KEYS and "seed" not in EVAL_KEYS  # the base model's greedy evaluation ignores them
