"""Bad input: one line naming the bad value, exit code 2, no traceback, nothing written."""

import subprocess
import sys

import pytest

from tokeneff.cli import main

TRAIN = ["train", "--model", "tiny-random", "--steps", "1"]


@pytest.mark.parametrize("argv, needle", [
    (["train", "--algo", "ppo"], "invalid choice: 'ppo'"),
    (["train", "--task", "gsm8k"], "invalid choice: 'gsm8k'"),
    (["train", "--profile", "huge"], "invalid choice: 'huge'"),
    (TRAIN + ["group_size=1"], "group_size=1"),
    (TRAIN + ["sgrpo_p=2"], "sgrpo_p=2.0"),
    (TRAIN + ["lr=-1"], "lr=-1.0"),
    (TRAIN + ["digits_a=13"], "digits_a=13"),
    (TRAIN + ["grop_size=4"], "did you mean 'group_size'"),
    (TRAIN + ["beta"], "expected key=value"),
    (["train", "--model", "tiny-random", "--steps", "0"], "steps=0"),
    (["train", "--model", "no-such-model", "--steps", "1"], "model='no-such-model'"),
    (TRAIN + ["svamp_dir=/nonexistent", "--task", "svamp"], "SVAMP file '/nonexistent' not found"),
    (["evaluate", "--model", "tiny-random", "--limit", "-1", "--out", "x.json"], "limit=-1"),
    (["bench", "--completion-lens", "0"], "expected positive integers"),
    (["bench", "--name", "a/b"], "--name='a/b'"),
    (["bench", "--vs-trl", "--steps", "1"], "--steps=1"),
    (["bench", "--vs-trl", "--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["bench", "--vs-trl", "--algos", "tspmo,spmo"], "--algos='tspmo,spmo'"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("x.json", str(tmp_path / "x.json")) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) if "invalid choice" in needle else _noraise() as exc:
        code = main(argv)
    code = exc.value.code if exc is not None and hasattr(exc, "value") else code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "x.json").exists()


def test_unreachable_hub_id_says_how_to_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read at import: without this the hub client still tries the network and waits out its retries (~45 s)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    code = main(["train", "--model", "someone/not-cached-model", "--steps", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "someone/not-cached-model" in err and "smollm2-135m" in err and "local path" in err


class _noraise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_no_arguments_prints_the_usage_and_the_commands_exit_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tokeneff") and all(c in err for c in ("train", "evaluate", "warmstart", "bench"))


def test_version_is_the_package_version(capsys):
    import re
    from pathlib import Path

    import tokeneff

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"tokeneff {tokeneff.__version__}\n"
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == tokeneff.__version__


def test_python_dash_m_tokeneff_is_the_cli(tmp_path):
    import subprocess
    import sys

    import tokeneff

    run = lambda *a: subprocess.run([sys.executable, "-m", "tokeneff", *a], capture_output=True, text=True,
                                    cwd=tmp_path, timeout=120)
    version, bare = run("--version"), run()
    assert version.returncode == 0 and version.stdout == f"tokeneff {tokeneff.__version__}\n"
    assert bare.returncode == 2 and bare.stderr.startswith("usage: tokeneff") and "Traceback" not in bare.stderr


def test_ctrl_c_while_the_command_loads_is_one_line_until_main_starts():
    """A Ctrl-C during the command's imports (torch, transformers, pandas: seconds) ends it quietly with exit 130; once
    `main` runs, Ctrl-C is Python's again (main turns it into a checkpoint and one line)."""
    load = "import os, signal, sys\nsys.argv = ['tokeneff']\nimport tokeneff.cli\n"
    during = subprocess.run([sys.executable, "-c", load + "os.kill(os.getpid(), signal.SIGINT)\nimport time\n"
                             "time.sleep(30)"], capture_output=True, text=True, timeout=120)
    assert during.returncode == 130 and "interrupted while loading" in during.stderr, during.stderr
    assert "Traceback" not in during.stderr
    after = subprocess.run([sys.executable, "-c", load + "tokeneff.cli.main([])\n"
                            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"],
                           capture_output=True, text=True, timeout=120)
    assert after.stdout.strip() == "True", after.stderr
