"""tokeneff: token-efficient RL for LLM reasoning (Lee & Tong, arXiv 2504.20834) with LoRA.

    from tokeneff import TrainConfig, make_config, train, evaluate
"""

__version__ = "0.1.0"  # as in pyproject.toml (tests/test_cli.py checks that they agree)

import os as _os  # noqa: E402
import signal as _signal  # noqa: E402
import sys as _sys  # noqa: E402

# The `tokeneff` command spends its first seconds importing torch, transformers and pandas, before its own Ctrl-C
# handling exists: a Ctrl-C then ends it quietly (exit 130) instead of with a traceback from inside an import, until
# `cli.main` starts (`loaded()`). Only for the command: imported from a user's code or a notebook, an interrupt stays a
# KeyboardInterrupt.
_command = _sys.argv[0:1] == ["-m"] or _os.path.basename(_sys.argv[0] if _sys.argv else "") == "tokeneff"


def _quit_while_loading(*_) -> None:
    _os.write(2, b"\ninterrupted while loading: nothing was done\n")
    _os._exit(130)


_loading = _command
_previous = _signal.signal(_signal.SIGINT, _quit_while_loading) if _command else None


def loaded() -> None:
    """The command's imports are done (cli.main has started): Ctrl-C is Python's KeyboardInterrupt again."""
    global _loading
    if _loading:
        _signal.signal(_signal.SIGINT, _previous if _previous is not None else _signal.default_int_handler)
        _loading = False


from .config import TrainConfig, make_config  # noqa: E402
from .errors import ConfigError, TokeneffError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .loop import train  # noqa: E402

__all__ = ["TrainConfig", "make_config", "train", "evaluate", "TokeneffError", "ConfigError", "__version__"]
