"""Run by tests/test_multiprocess.py under `torchrun --nproc_per_node 2`: train on the toy task.

argv: OUT [resume]"""

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_train import FirstDigitTask  # noqa: E402

from tokeneff import make_config, train  # noqa: E402

cfg = make_config("embedded", overrides=dict(model="tiny-random", task="multiplication", algo="sgrpo", steps=4,
                                             group_size=4, prompts_per_step=2, max_new_tokens=4, lr=0.05,
                                             lora_dropout=0.0, eval_limit=2, eval_batch_size=2, save_every=1,
                                             out=sys.argv[1]))
train(cfg, resume="resume" in sys.argv[2:], progress=False, custom_task=FirstDigitTask(num_shots=0))
