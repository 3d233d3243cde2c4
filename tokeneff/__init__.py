"""tokeneff: token-efficient RL for LLM reasoning (Lee & Tong, arXiv 2504.20834) with LoRA.

    from tokeneff import TrainConfig, make_config, train, evaluate
"""

from .config import ConfigError, TokeneffError, TrainConfig, make_config
from .evaluate import evaluate
from .train import train

__all__ = ["TrainConfig", "make_config", "train", "evaluate", "TokeneffError", "ConfigError"]
__version__ = "0.1.0"
