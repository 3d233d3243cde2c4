import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_cfg(tmp_path):
    """A config for fast tiny-random runs."""
    from tokeneff import make_config

    def make(**over):
        base = dict(model="tiny-random", task="multiplication", digits_a=1, digits_b=1, steps=2,
                    group_size=4, prompts_per_step=2, max_new_tokens=8, eval_limit=4, eval_batch_size=4,
                    out=str(tmp_path / "run"), save_every=1, lr=1e-2, beta=0.04)
        base.update(over)
        return make_config("embedded", overrides=base)

    return make


@pytest.fixture
def model_dir(tmp_path, capsys):
    """tiny-random saved as an ordinary Hugging Face model folder (config, weights, tokenizer)."""
    from tokeneff.models import tiny_random

    model, tok = tiny_random()
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    capsys.readouterr()
    return d


SPAWNS = ("subprocess", "Popen", "torchrun", "workers=2", "sys.executable")


def pytest_collection_modifyitems(config, items):
    """`process`: tests that start other processes (the CLI in a subprocess, torchrun, grid workers): the slow part
    of the suite, left out by `make test-fast`."""
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        try:
            src = inspect.getsource(fn) if fn else ""
        except (OSError, TypeError):
            src = ""
        if any(s in src for s in SPAWNS) or item.module.__name__.endswith(("test_killloop", "test_multiprocess")):
            item.add_marker(pytest.mark.process)
