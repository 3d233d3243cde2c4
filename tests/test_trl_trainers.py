"""SGRPOTrainer / TSPMOTrainer (tokeneff.trl_trainers) against tokeneff's own loss, TRL's GRPOTrainer and TRL's
private API. Tiny-random model, fp32 (GRPOConfig's bf16 defaults to True even on a CPU), one or two steps each."""

import inspect
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import trl
from datasets import Dataset
from packaging.specifiers import SpecifierSet
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from tokeneff.algorithms import ALGORITHMS
from tokeneff.algorithms.tspmo import prefix_advantages
from tokeneff.errors import ConfigError
from tokeneff.loss import SelectiveLogProbs, policy_loss
from tokeneff.models import load_model
from tokeneff.trl_trainers import (
    TRL_SIGNATURES,
    TRL_TESTED,
    SGRPOTrainer,
    TSPMOTrainer,
    credit_tensors,
    trl_signature_changes,
)

G = 4
# equal-length prompts: TRL's training forward numbers positions from the left padding, ours from the first token
PROMPTS = ["1*2=", "3*4=", "5*6=", "7*8="]


def reward(prompts, completions, kind, **columns):
    """every other completion of a "mixed" prompt's group rewarded; a "flat" prompt's group all 1 (no signal)"""
    return [1.0 if k == "flat" else float(i % 2) for i, k in enumerate(kind)]


def data(n=2, flat=()):
    return Dataset.from_list([dict(prompt=PROMPTS[i], kind="flat" if i in flat else "mixed") for i in range(n)])


class Recorder(TrainerCallback):
    """LoRA gradients just before each optimiser step (after accumulation, before the update)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def recording(cls):
    class Recording(cls):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.batches = getattr(self, "batches", []) + [dict(out, credits=getattr(self, "_last_credits", None))]
            return out

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            self.losses = getattr(self, "losses", []) + [loss.detach()]
            return loss

    return Recording


def make(cls, out, n=2, flat=(), per_device=None, ga=1, steps=1, lr=0.0, beta=0.0, max_len=12, seed=0,
         perturb=True, cuda=False, **kw):
    """A trainer on tiny-random with LoRA on q/v; `perturb` moves the adapter off zero so that every LoRA matrix
    has a gradient and the policy differs from the reference (KL > 0)."""
    model, tok = load_model("tiny-random")
    torch.manual_seed(seed)
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=per_device or G * n,
                      gradient_accumulation_steps=ga, num_generations=G, max_completion_length=max_len,
                      max_steps=steps, learning_rate=lr, beta=beta, bf16=False, use_cpu=not cuda, report_to=[],
                      save_strategy="no", logging_steps=1, seed=seed, max_grad_norm=0.0, shuffle_dataset=False,
                      disable_tqdm=True, **{k: kw.pop(k) for k in list(kw) if k in GRPOConfig.__dataclass_fields__})
    rec = Recorder()
    trainer = recording(cls)(model=model, reward_funcs=reward, args=args, train_dataset=data(n, flat),
                             processing_class=tok, callbacks=[rec],
                             peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"]), **kw)
    if perturb:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(123)
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen).to(p.device))
    trainer.recorder = rec
    return trainer


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def max_rel_grad(ga, gb):
    assert ga.keys() == gb.keys()
    assert all(gb[k].norm() > 0 for k in gb)
    return max(rel(ga[k], gb[k]) for k in gb)


def reference(trainer, batch, algo, cfg, beta=0.0):
    """tokeneff's own loss on the trainer's completions and rewards: credits from tokeneff.algorithms (the same
    seeded stream as the trainer's), log-probs from SelectiveLogProbs, loss from policy_loss, scaled by 1/S as in
    tokeneff.train. Returns (loss, LoRA gradients, credited cells)."""
    comps, rewards = batch["credits"]["completions"], batch["credits"]["rewards"].tolist()
    rng = random.Random(trainer.args.seed + 1)
    rows, cols, adv, weight, signal = [], [], [], [], 0
    for g in range(len(comps) // G):
        credits = ALGORITHMS[algo](comps[g * G:(g + 1) * G], rewards[g * G:(g + 1) * G], cfg, rng)
        signal += bool(len(credits))
        for i, t, a, w in zip(credits.seq, credits.pos, credits.adv, credits.weight):
            rows.append(g * G + i)
            cols.append(t)
            adv.append(a)
            weight.append(w)
    policy = trainer.model
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    lp = SelectiveLogProbs(policy)
    B, dev = len(comps), batch["completion_ids"].device
    kw = dict(ctx_ids=batch["prompt_ids"][::G], ctx_mask=batch["prompt_mask"][::G],
              comp_ids=batch["completion_ids"], comp_mask=batch["completion_mask"],
              row_ctx=torch.arange(B, device=dev) // G, rows=torch.tensor(rows, device=dev),
              pos=torch.tensor(cols, device=dev))
    logp = lp(**kw)
    ref = None
    if beta:
        with torch.no_grad(), policy.disable_adapter():
            ref = lp(**kw)
    w, a = torch.tensor(weight, device=dev) / signal, torch.tensor(adv, device=dev)
    loss, kl = policy_loss(logp, a, w, ref, beta)
    grads = torch.autograd.grad(loss, list(params.values()))
    # at ratio 1 the policy term's value is -sum w A, zero up to rounding when a group's advantages sum to zero:
    # losses are compared relative to the size of their terms, sum w |A| + beta * KL
    scale = float((w * a.abs()).sum() + beta * kl)
    return loss.detach(), dict(zip(params, grads)), set(zip(rows, cols)), scale


def trainer_cells(batch):
    return {tuple(x) for x in (batch["tool_mask"] != 0).nonzero().tolist()}


# --------------------------------------------------------------------------------------------------------------

def test_trl_private_api_unchanged():
    """The subclasses override TRL private methods: fail loudly if a TRL release changes them."""
    assert trl.__version__ in SpecifierSet(TRL_TESTED), f"trl {trl.__version__} is outside the tested {TRL_TESTED}"
    for name, sig in TRL_SIGNATURES.items():
        assert str(inspect.signature(getattr(GRPOTrainer, name))) == sig, f"GRPOTrainer.{name} changed signature"
    assert trl_signature_changes() == []
    # the loss reads these keys from the generation batch and these loss types exist
    src = inspect.getsource(GRPOTrainer._compute_loss)
    assert 'completion_mask * inputs["tool_mask"]' in src
    assert 'inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes' in src
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"trl{TRL_TESTED}"' in pyproject


def test_credit_tensors_layout_and_unscorable_completions():
    """Rows of this process only; a NaN reward (every reward function returned None) leaves its completion out of
    its group: no credit, and G counts the others."""
    from tokeneff.config import TrainConfig

    cfg = TrainConfig(algo="sgrpo", sgrpo_alpha=3, sgrpo_k=3)
    comps = [[1, 2, 3], [1, 2], [4], [5, 6, 7, 8], [1], [1], [1], [1]]
    rewards = [1.0, 0.0, float("nan"), 0.0, 1.0, 1.0, 1.0, 1.0]  # group 2: no signal
    adv, w, signal, cells = credit_tensors(comps, rewards, 4, "sgrpo", cfg, random.Random(0), range(0, 4), 5)
    assert signal == 1 and cells == 3 + 2 + 3
    assert adv[2].abs().sum() == 0 and w[2].sum() == 0
    assert w[0, :3].tolist() == pytest.approx([1 / 9] * 3) and w[1, :2].tolist() == pytest.approx([1 / 6] * 2)
    assert w[3, 3] == 0 and w[3, :3].tolist() == pytest.approx([1 / 9] * 3)  # at most k = 3 kept
    assert adv[0, 0] > 0 > adv[1, 0] and adv[0, 0] == adv[0, 2]
    # the second process's rows of the same batch: group 2 only, which carries no signal
    adv2, w2, signal2, _ = credit_tensors(comps, rewards, 4, "sgrpo", cfg, random.Random(0), range(4, 8), 5)
    assert signal2 == signal and w2.sum() == 0


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_sgrpo_trainer_equals_tokeneff_loss(tmp_path, beta):
    """One step: same completions, rewards and kept positions -> same loss and LoRA gradients as tokeneff's loss.
    One of the three groups has no reward variance (left out of S, as in tokeneff.train). The KL term is our k3
    estimator when TRL's use_bias_correction_kl (default True: the KL times the differentiable ratio) is off."""
    t = make(SGRPOTrainer, tmp_path, n=3, flat=(1,), beta=beta, use_bias_correction_kl=False, sgrpo_alpha=2,
             sgrpo_p=0.5, sgrpo_k=6)
    t.train()
    batch = t.batches[0]
    loss, grads, cells, scale = reference(t, batch, "sgrpo", t._algo_cfg, beta)
    assert batch["credits"]["signal_groups"] == 2
    assert trainer_cells(batch) == cells  # the same kept positions
    lens = batch["completion_mask"].sum(1).tolist()
    assert any(len([c for r, c in cells if r == i]) < lens[i] for i in range(len(lens)))  # a real subset
    assert abs(float(t.losses[0] - loss)) < 1e-5 * scale
    assert max_rel_grad(t.recorder.grads[0], grads) < 1e-5


def test_tspmo_trainer_equals_tokeneff_loss(tmp_path):
    """T-SPMO: Q(p, v) - V(p) advantages, each distinct edge once (on its first completion), weight 1/#edges."""
    t = make(TSPMOTrainer, tmp_path, n=3, flat=(2,), beta=0.04, use_bias_correction_kl=False)
    t.train()
    batch = t.batches[0]
    loss, grads, cells, scale = reference(t, batch, "tspmo", t._algo_cfg, 0.04)
    comps, rewards = batch["credits"]["completions"], batch["credits"]["rewards"].tolist()
    want = {}
    for g in range(2):
        edges = [(g * G + i, p, a) for i, p, a in prefix_advantages(comps[g * G:(g + 1) * G],
                                                                    rewards[g * G:(g + 1) * G]) if abs(a) > 1e-12]
        want.update({(r, p): (a, 1 / len(edges)) for r, p, a in edges})
    assert trainer_cells(batch) == cells == set(want)
    # the loss forward stopped after the last credited column
    T = batch["completion_ids"].size(1)
    key = "tokeneff/frac_columns_forwarded"
    logged = [h[key] for h in t.state.log_history if key in h]
    assert logged == [pytest.approx((max(p for _, p in cells) + 1) / T)]
    for (r, p), (a, w) in want.items():
        assert batch["advantages"][r, p].item() == pytest.approx(a, rel=1e-6)
        assert batch["tool_mask"][r, p].item() == pytest.approx(w, rel=1e-6)
    assert abs(float(t.losses[0] - loss)) < 1e-5 * scale
    assert max_rel_grad(t.recorder.grads[0], grads) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls, algo", [(SGRPOTrainer, "sgrpo"), (TSPMOTrainer, "tspmo")])
def test_parity_on_cuda(tmp_path, cls, algo):
    """On CUDA, TRL's fused head takes its compact path (Triton: only the labelled, i.e. credited, positions are
    projected). fp32; a looser bound than on the CPU: both sides' kernels, not one summation order."""
    kw = dict(sgrpo_alpha=2, sgrpo_k=6) if algo == "sgrpo" else {}
    t = make(cls, tmp_path, n=3, flat=(1,), beta=0.04, use_bias_correction_kl=False, cuda=True, **kw)
    t.train()
    batch = t.batches[0]
    assert batch["completion_ids"].is_cuda
    loss, grads, cells, scale = reference(t, batch, algo, t._algo_cfg, 0.04)
    assert trainer_cells(batch) == cells
    assert abs(float(t.losses[0] - loss)) < 1e-4 * scale
    assert max_rel_grad(t.recorder.grads[0], grads) < 1e-4


def test_sgrpo_keeping_every_token_equals_trl_grpo(tmp_path):
    """alpha = k = max length: S-GRPO is full-token GRPO, and TRL's loss_type="grpo" takes the same step when every
    group carries signal."""
    ours = make(SGRPOTrainer, tmp_path / "ours", sgrpo_alpha=12, sgrpo_k=12)
    ours.train()
    trl_grpo = make(recording(GRPOTrainer), tmp_path / "trl", loss_type="grpo")
    trl_grpo.train()
    a, b = ours.batches[0], trl_grpo.batches[0]
    assert torch.equal(a["completion_ids"], b["completion_ids"])  # same seed, same samples
    assert trainer_cells(a) == {tuple(x) for x in a["completion_mask"].nonzero().tolist()}
    assert abs(float(ours.losses[0] - trl_grpo.losses[0])) < 1e-6  # both ~0: advantages sum to zero per group
    assert max_rel_grad(ours.recorder.grads[0], trl_grpo.recorder.grads[0]) < 1e-5


def test_gradient_accumulation_gives_the_same_step(tmp_path, monkeypatch):
    """8 completions as one micro-batch, or as two accumulated micro-batches: the same gradient. The second run
    also takes TRL's compact fused-head path (as on CUDA), which scores only the credited positions."""
    one = make(TSPMOTrainer, tmp_path / "one")
    one.train()
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    two = make(TSPMOTrainer, tmp_path / "two", per_device=G, ga=2)
    two.train()
    assert torch.equal(one.batches[0]["completion_ids"], two.batches[0]["completion_ids"])
    assert len(two.losses) == 2 and len(two.recorder.grads) == 1
    assert max_rel_grad(two.recorder.grads[0], one.recorder.grads[0]) < 1e-5


def test_num_iterations_and_training_moves_the_adapter(tmp_path):
    t = make(SGRPOTrainer, tmp_path, steps=2, lr=1e-2, num_iterations=2, perturb=False, sgrpo_alpha=2, sgrpo_k=4)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    t.train()
    assert len(t.batches) == 1 and len(t.losses) == 2  # one generation, used twice
    assert all(torch.isfinite(x) for x in t.losses)
    after = dict(t.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logged = [h for h in t.state.log_history if "tokeneff/frac_tokens_in_loss" in h]
    assert logged and 0 < logged[0]["tokeneff/frac_tokens_in_loss"] < 1


@pytest.mark.parametrize("bad, fragment", [
    (dict(sgrpo_p=1.5), "sgrpo_p=1.5"),
    (dict(sgrpo_alpha=30, sgrpo_k=10), "sgrpo_alpha=30"),
    (dict(adv_eps=0.0), "adv_eps=0.0"),
    (dict(loss_type="grpo"), "loss_type='grpo'"),
    (dict(scale_rewards="none"), "scale_rewards='none'"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile=0.2"),
    (dict(importance_sampling_level="sequence", loss_type="grpo"), "loss_type='grpo'"),
    (dict(sgrpo_p="0.5"), "sgrpo_p='0.5': "),  # no TypeError from a comparison
    (dict(sgrpo_k=True), "sgrpo_k=True: "),
    # the ranges `tokeneff train` enforces, for the settings TRL's config shares with ours
    (dict(weight_decay=-1.0), "weight_decay=-1.0: "),
    (dict(lr=5.0), "learning_rate=5.0: "),
    (dict(lr=0.5, weight_decay=2.0), "needs learning_rate * weight_decay below 1"),
])
def test_bad_values_raise_one_line_config_error(tmp_path, bad, fragment):
    with pytest.raises(ConfigError) as e:
        make(SGRPOTrainer, tmp_path, **bad)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_tspmo_ignores_scale_rewards_and_takes_no_sgrpo_knobs(tmp_path):
    make(TSPMOTrainer, tmp_path, scale_rewards="none", perturb=False)
    for bad, fragment in ((dict(sgrpo_alpha=3), "sgrpo_alpha=3: not a parameter of TSPMOTrainer"),
                          (dict(replay="on"), "replay='on': not a parameter of TSPMOTrainer: T-SPMO's replay")):
        with pytest.raises(ConfigError) as e:  # the one-line refusal, not TypeError from GRPOTrainer.__init__
            make(TSPMOTrainer, tmp_path, **bad)
        assert fragment in str(e.value) and "\n" not in str(e.value)


WORKER = """
import json, sys
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig
from tokeneff.models import load_model
from tokeneff.trl_trainers import SGRPOTrainer, TSPMOTrainer

algo, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
model, tok = load_model("tiny-random")
data = Dataset.from_list([dict(prompt=p) for p in ["1*2=", "3*4=", "5*6=", "7*8="]])
def reward(prompts, completions, **kw):
    return [float(i % 2) for i in range(len(completions))]
# G = 4 completions per prompt, 2 per process: every group is split across the two ranks
args = GRPOConfig(output_dir=out, per_device_train_batch_size=2, num_generations=4, max_completion_length=8,
                  max_steps=2, learning_rate=1e-2, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                  logging_steps=1, seed=0, disable_tqdm=True)
cls, kw = (SGRPOTrainer, dict(sgrpo_alpha=2, sgrpo_k=4)) if algo == "sgrpo" else (TSPMOTrainer, {})
trainer = cls(model, reward, args=args, train_dataset=data, processing_class=tok,
              peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]), **kw)
trainer.train()
rank = trainer.accelerator.process_index
state = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
torch.save(state, f"{out}/adapter_rank{rank}.pt")
logs = [h for h in trainer.state.log_history if "tokeneff/groups_with_signal" in h]
json.dump(dict(world=trainer.accelerator.num_processes, logs=logs), open(f"{out}/rank{rank}.json", "w"))
"""


@pytest.mark.parametrize("algo", [pytest.param("sgrpo", marks=pytest.mark.slow), "tspmo"])
def test_accelerate_launch_two_processes(tmp_path, algo):
    """`accelerate launch` with two CPU processes (gloo): groups straddle the ranks (T-SPMO's prefix tree needs the
    other rank's completions), ranks end with equal adapters. ~30 s each."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", str(worker), algo, str(tmp_path)]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in info] == [2, 2]
    assert all(log["tokeneff/groups_with_signal"] == 1 for log in info[0]["logs"])
    a, b = (torch.load(tmp_path / f"adapter_rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = load_model("tiny-random")[0]  # LoRA B starts at zero: training moved it
    assert init is not None and any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
