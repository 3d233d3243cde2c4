"""tokeneff: token-efficient RL for LLM reasoning (Lee & Tong, arXiv 2504.20834) with LoRA.

    from tokeneff import TrainConfig, make_config, train, evaluate
"""

__version__ = "0.1.0"  # as in pyproject.toml (tests/test_cli.py checks that they agree)

from .config import ConfigError, TokeneffError, TrainConfig, make_config  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .train import train  # noqa: E402

__all__ = ["TrainConfig", "make_config", "train", "evaluate", "TokeneffError", "ConfigError", "__version__"]
