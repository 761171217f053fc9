# Everyday commands. PYTHON defaults to the project's virtual environment once `make install` made it.
VENV ?= .venv
PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
TORCH ?= torch==2.13.0
RUNS ?= runs
SMOKE = table1_t5_base_smoke table1_t5_large_smoke table1_gpt2_smoke table2_smoke table3_smoke table4_smoke \
        extra_methods_t5_base_smoke extra_methods_gpt2_smoke

.PHONY: install test test-all test-sweeps lint dry-run tables smoke gpu-hours real-minilm minilm-converged minilm-converged-extra plain-finetune minilm-stsb-b32

install:  ## virtual environment + torch (CPU-only here; the CUDA build on GPU machines) + this package
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[dev]"

test:  ## the default test run (CPU, offline, one test process per core; about 3-4 minutes on 2 cores)
	$(PYTHON) -m pytest -m "not slow" -q -n auto --dist worksteal

test-all:  ## every test but the full smoke sweeps: slow ones included (sweeps, launchers, smoke + tables, benchmarks, kill/resume)
	$(PYTHON) -m pytest -m "not sweep" -q -n auto --dist worksteal

test-sweeps:  ## the full smoke sweeps of every experiment, then the tables (35+ minutes on 2 cores)
	$(PYTHON) -m pytest -m sweep -q

lint:
	$(PYTHON) -m ruff check mpoe_exp tests benchmarks
	$(PYTHON) -m ruff format --check mpoe_exp tests benchmarks

dry-run:  ## parameter counts of every paper model/method, no download
	@for spec in "t5-base dense" "t5-base switch" "t5-base moe" "t5-base mpoe" "t5-base mpoe++" \
	             "t5-large dense" "t5-large mpoe" "gpt2 dense" "gpt2 switch" "gpt2 mpoe" "gpt2 mpoe++" \
	             "t5-base cartesian" "t5-base meo" "t5-base adapters" "gpt2 cartesian" "gpt2 meo" "gpt2 adapters"; do \
	  set -- $$spec; $(PYTHON) -m mpoe_exp model=$$1 method=$$2 dry_run=true | head -2; done
	@for a in no_sharing no_mask m3 m5 m7 m9; do \
	  $(PYTHON) -m mpoe_exp model=gpt2 method=mpoe ablation=$$a dry_run=true | head -2; done
	@for m in minilm bert-base; do for x in dense switch moe mpoe mpoe++ cartesian meo meo_token adapters; do \
	  $(PYTHON) -m mpoe_exp model=$$m method=$$x dry_run=true | head -2; done; done

tables:  ## the paper's Tables 1-4 beside our results, in runs/<experiment>/tables/
	$(PYTHON) -m mpoe_exp.tables $(RUNS)

JOBS ?= 2
# minilm-stsb-b32's device: auto (a GPU where there is one), cpu, cuda, cuda:N
DEVICE ?= auto
smoke:  ## every table's sweep on tiny models and demo data (CPU, offline, JOBS runs at a time), then the tables
	@for e in $(SMOKE); do OMP_NUM_THREADS=1 $(PYTHON) -m mpoe_exp -m experiment=$$e runs_dir=$(RUNS) \
	  hydra/launcher=local_parallel hydra.launcher.n_jobs=$(JOBS) || exit 1; done
	$(PYTHON) -m mpoe_exp.tables $(RUNS) --experiment smoke

GLUE_DIR ?=
REAL_MINILM = runs_dir=$(RUNS) cpu_threads=1 hydra/launcher=local_parallel hydra.launcher.n_jobs=$(JOBS)
real-minilm:  ## pre-trained MiniLM on real SST-2 and RTE, every method, 3 seeds, JOBS runs at a time (about 2.6 h on 2 cores; resumable), then its table
	@test -n "$(GLUE_DIR)" || { echo "error: set GLUE_DIR=/path/to/glue (RTE/ and SST-2/ in the GLUE download-script layout)" >&2; exit 2; }
	@for seed in 1 2 3; do for t in sst2 rte; do \
	  $(PYTHON) -m mpoe_exp -m experiment=real_minilm_$$t data_dir=$(GLUE_DIR) $(REAL_MINILM) seed=$$seed || exit 1; \
	  $(PYTHON) -m mpoe_exp -m experiment=real_minilm_$$t data_dir=$(GLUE_DIR) $(REAL_MINILM) seed=$$seed \
	    method=mpoe ablation=no_mask,no_sharing || exit 1; done; done
	$(PYTHON) -m mpoe_exp.tables $(RUNS) --experiment real_minilm

CONVERGED = data_dir=$(GLUE_DIR) runs_dir=$(RUNS) cpu_threads=1 hydra/launcher=local_parallel hydra.launcher.n_jobs=$(JOBS)
minilm-converged:  ## the pre-registered MiniLM study (REPRODUCTION.md): dense/switch/mpoe x SST-2, STS-B x 5 seeds x 2 lrs (resumable), then its tables
	@test -n "$(GLUE_DIR)" || { echo "error: set GLUE_DIR=/path/to/glue (SST-2/ and STS-B/ in the GLUE download-script layout)" >&2; exit 2; }
	@for seed in 1 2 3 4 5; do for t in sst2 stsb; do \
	  $(PYTHON) -m mpoe_exp -m experiment=minilm_converged_$$t $(CONVERGED) seed=$$seed || exit 1; done; done
	$(PYTHON) -m mpoe_exp.tables $(RUNS) --experiment minilm_converged

minilm-converged-extra:  ## the study's optional methods on SST-2 (its STS-B did not converge), in the design's order: mpoe without the mask, without sharing, mpoe++, moe
	@test -n "$(GLUE_DIR)" || { echo "error: set GLUE_DIR=/path/to/glue" >&2; exit 2; }
	@for extra in "method=mpoe ablation=no_mask" "method=mpoe ablation=no_sharing" "method=mpoe++" "method=moe"; do \
	  for seed in 1 2 3 4 5; do \
	  $(PYTHON) -m mpoe_exp -m experiment=minilm_converged_sst2 $(CONVERGED) seed=$$seed $$extra || exit 1; done; done
	$(PYTHON) -m mpoe_exp.tables $(RUNS) --experiment minilm_converged

STSB_B32 = experiment=minilm_stsb_b32 data_dir=$(GLUE_DIR) runs_dir=$(RUNS) hydra/launcher=local_parallel hydra.launcher.n_jobs=$(JOBS)
minilm-stsb-b32:  ## the STS-B follow-up (REPRODUCTION.md), made for a GPU: plain fine-tunes, dense/switch/mpoe, the optional methods, tables
	@test -n "$(GLUE_DIR)" || { echo "error: set GLUE_DIR=/path/to/glue (STS-B/ in the GLUE download-script layout)" >&2; exit 2; }
	@mkdir -p $(RUNS)/minilm_stsb_b32/plain_finetune
	@for seed in 1 2 3 4 5; do out=$(RUNS)/minilm_stsb_b32/plain_finetune/stsb_seed$$seed.json; \
	  test -f $$out || $(PYTHON) benchmarks/plain_finetune.py --data-dir $(GLUE_DIR) --task stsb --seed $$seed \
	    --device $(DEVICE) --out $$out || exit 1; done
	$(PYTHON) -m mpoe_exp -m $(STSB_B32) device=$(DEVICE)
	@for extra in "method=mpoe ablation=no_mask" "method=mpoe ablation=no_sharing" "method=mpoe++" "method=moe"; do \
	  $(PYTHON) -m mpoe_exp -m $(STSB_B32) device=$(DEVICE) $$extra || exit 1; done
	$(PYTHON) -m mpoe_exp.tables $(RUNS) --experiment minilm_stsb_b32

plain-finetune:  ## the study's reference: benchmarks/plain_finetune.py at its defaults, seeds 1-3, SST-2 and STS-B
	@test -n "$(GLUE_DIR)" || { echo "error: set GLUE_DIR=/path/to/glue" >&2; exit 2; }
	@mkdir -p $(RUNS)/minilm_converged/plain_finetune
	@for seed in 1 2 3; do for t in sst2 stsb; do out=$(RUNS)/minilm_converged/plain_finetune/$${t}_seed$$seed.json; \
	  test -f $$out || OMP_NUM_THREADS=1 $(PYTHON) benchmarks/plain_finetune.py --data-dir $(GLUE_DIR) --task $$t \
	    --seed $$seed --out $$out || exit 1; done; done

gpu-hours:  ## estimated GPU hours of each table's sweep (mpoe_exp/cost.py)
	$(PYTHON) -m mpoe_exp.cost
