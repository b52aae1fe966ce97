# wadi-companion: make reproduce | make report | make test | make venv | make clean
#
#   make reproduce                 run every notebook (profile tiny) in place, refresh results/ and the report
#   ONLY=00 make reproduce         only notebook 00 (comma-separated ids: ONLY=00,03)
#   FRESH=1 make reproduce         ignore cached artifacts in data/ and retrain
#   PROFILE=smoke make reproduce   another profile: smoke | tiny | paper-smoke | paper
#   make report                    the executed notebooks as HTML with an index of claims, figures and tables
#                                  (results/report/index.html; python -m wadi_core.report; nothing is executed)
#   make lint                      ruff over wadi_core, tests and notebooks (part of make test)
#   make test                      lint, unit tests, smoke runs of every notebook (smoke, paper-smoke), nbval
#   make bench                     LoRaD's cost per Linear, per tiny-world training step and per SD1.5 U-Net step,
#                                  and the teacher and WaDi steps of three tiny worlds (python -m wadi_core.benchmarks
#                                  layers, training-step, sd15-step, worlds; about 20 minutes)
#   make bench-kernels             fused Triton LoRaD vs the GEMM floor (python -m wadi_core.benchmarks kernels)
#   make gpu-wheels                download into gpu_wheels/ the wheels make gpu-check needs beyond torch and triton
#                                  (run where pip reaches the package index; GPU_PYTHON_VERSION, GPU_WHEELS_PROVIDED)
#   make gpu-check                 on a CUDA machine without network (torch, triton, gpu_wheels/): the kernels in fp16
#                                  and bf16, the SD1.5 student step with LoRaD vs the official hook (under 8 minutes)

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
MAKEFLAGS += --no-builtin-rules --no-builtin-variables
.SUFFIXES:
.DELETE_ON_ERROR:
.NOTPARALLEL:

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

PROFILE ?= tiny
ONLY ?=
FRESH ?=
REPRODUCE_FLAGS := --profile $(PROFILE) $(if $(ONLY),--only $(ONLY)) $(if $(filter 1,$(FRESH)),--fresh)

# The numbered notebooks (executed copies of failed runs excluded); nbval checks them as committed.
NOTEBOOKS := $(sort $(filter-out %.failed.ipynb,$(wildcard notebooks/[0-9][0-9]_*.ipynb)))

.PHONY: venv reproduce report lint test test-unit test-smoke test-nbval bench bench-kernels clean

venv: $(STAMP)

# Reinstalls only when requirements.txt or pyproject.toml change. A new venv gets a setuptools that builds
# editable installs by itself, so the editable install of this repo needs no build isolation (works offline).
$(STAMP): requirements.txt pyproject.toml
	@if [ ! -x $(PY) ]; then \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install --upgrade "setuptools>=70.1"; \
	fi
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	@touch $@

# The report is refreshed after a successful run (not by the smoke runs of make test, which call the module).
reproduce: venv
	$(PY) -m wadi_core.reproduce $(REPRODUCE_FLAGS)
	$(PY) -m wadi_core.report

# Renders the committed, executed notebooks and results/ (about 15 s); the pages are git-ignored, the screenshots
# that tests/test_report_browser.py takes of the index are committed.
report: venv
	$(PY) -m wadi_core.report

test: lint test-unit test-smoke test-nbval

# ruff (pinned in requirements.txt; settings in pyproject.toml) over the library, the tests and the notebooks.
lint: venv
	@echo "=== test 1/4: lint (ruff check wadi_core tests notebooks) ==="
	$(PY) -m ruff check wadi_core tests notebooks

test-unit: venv
	@echo "=== test 2/4: unit tests (pytest tests) ==="
	@start=$$(date +%s); \
	$(PY) -m pytest tests; \
	echo "=== unit tests passed in $$(( $$(date +%s) - start )) s ==="

# Every notebook, retrained from scratch, network blocked, in a throw-away directory (kept and named when the run
# fails, so the executed copy with the traceback can be read), at two profiles side by side on one thread each:
# smoke (the tiny world) and paper-smoke (the same notebooks on a random-weight SD1.5-structured pipeline).
SMOKE_PROFILES := smoke paper-smoke

test-smoke: venv
	@echo "=== test 3/4: smoke runs of every notebook (profiles $(SMOKE_PROFILES), fresh, network blocked) ==="
ifeq ($(NOTEBOOKS),)
	@echo "no notebooks (notebooks/NN_name.ipynb) yet; skipping the smoke runs"
else
	@start=$$(date +%s); pids=(); dirs=(); \
	for profile in $(SMOKE_PROFILES); do \
		smoke_dir=$$(mktemp -d); dirs+=("$$smoke_dir"); \
		OMP_NUM_THREADS=1 WADI_CACHE_DIR="$$smoke_dir/cache" $(PY) -m wadi_core.reproduce --profile $$profile --fresh \
			--block-network --output-dir "$$smoke_dir/notebooks" --data-dir "$$smoke_dir/data" \
			--results-dir "$$smoke_dir/results" > "$$smoke_dir/log.txt" 2>&1 & pids+=($$!); \
	done; \
	failed=0; i=0; \
	for profile in $(SMOKE_PROFILES); do \
		if wait $${pids[$$i]}; then echo "--- $$profile: passed"; rm -rf "$${dirs[$$i]}"; \
		else failed=1; echo "--- $$profile: FAILED; its log, notebooks, data and results are kept in $${dirs[$$i]}"; \
			tail -n 40 "$${dirs[$$i]}/log.txt"; fi; \
		i=$$((i + 1)); \
	done; \
	[ $$failed = 0 ]; \
	echo "=== smoke runs passed in $$(( $$(date +%s) - start )) s ==="
endif

# Re-executes the committed notebooks with their committed parameters; WADI_NO_TRAIN=1 makes a missing
# bundled artifact an error instead of a silent retrain, and results go to a throw-away directory. The metric
# tests then hold the tables those runs wrote to the stored tiny-profile values (as Recommenders' notebook tests do).
test-nbval: venv
	@echo "=== test 4/4: nbval re-execution of the committed notebooks ==="
ifeq ($(NOTEBOOKS),)
	@echo "no committed notebooks (notebooks/NN_name.ipynb) yet; skipping nbval"
else
	@start=$$(date +%s); results_dir=$$(mktemp -d); trap 'rm -rf "$$results_dir"' EXIT; \
	WADI_NO_TRAIN=1 WADI_RESULTS_DIR="$$results_dir" \
		$(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider $(NOTEBOOKS); \
	echo "=== nbval passed in $$(( $$(date +%s) - start )) s; metric tests on the tables it wrote ==="; \
	WADI_METRICS_RESULTS_DIR="$$results_dir" $(PY) -m pytest tests/test_notebook_metrics.py -q
endif

# Forward+backward time and saved-for-backward bytes per adapted Linear at SD1.5 shapes, per WaDi generator step of
# each tiny-world student, per student step of the SD1.5 U-Net (one thread, each variant in its own process), and
# the teacher training step and WaDi generator step of the pixel, pixel-with-SD1.5-attention and latent tiny worlds
# with their equal-budget step counts (one thread);
# results/tables/benchmarks_{layers,training_step,sd15_step,worlds}.*.
bench: venv
	$(PY) -m wadi_core.benchmarks layers
	$(PY) -m wadi_core.benchmarks training-step
	OMP_NUM_THREADS=1 $(PY) -m wadi_core.benchmarks sd15-step --threads 1
	OMP_NUM_THREADS=1 $(PY) -m wadi_core.benchmarks worlds --threads 1

# Fused Triton LoRaD vs reference, official hook, plain Linears and the GEMM floor at SD1.5 shapes: fp16/bf16 on a
# CUDA GPU, fp32 on CPU (no Triton rows there); results/tables/benchmarks_kernels_<device>.csv.
bench-kernels: venv
	$(PY) -m wadi_core.benchmarks kernels --out results/tables --iters 10 --warmup 2 --budget-s 3600

# The GPU check's wheels, for the GPU machine's Python: every distribution python -m wadi_core.benchmarks gpu-check
# imports and what it needs, at this venv's versions, less torch, triton and GPU_WHEELS_PROVIDED (taken to be on that
# machine, with whatever only they need; GPU_WHEELS_PROVIDED= downloads all, about 90 MB).
GPU_WHEELS := gpu_wheels
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS_PROVIDED ?= numpy pandas matplotlib seaborn pillow
GPU_WHEEL_PLATFORMS := manylinux1 manylinux2010 manylinux2014 $(foreach n,17 24 27 28 31 34 35,manylinux_2_$(n))
GPU_PYTHON ?= python3
GPU_CHECK_FLAGS ?=
.PHONY: gpu-wheels gpu-check

gpu-wheels: venv
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m wadi_core.benchmarks gpu-check --wheel-pins --python-version $(GPU_PYTHON_VERSION) \
		--provided "$(GPU_WHEELS_PROVIDED)" > $(GPU_WHEELS)/pins.txt
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON_VERSION) $(foreach p,$(GPU_WHEEL_PLATFORMS),--platform $(p)_x86_64) \
		--dest $(GPU_WHEELS) -r $(GPU_WHEELS)/pins.txt
	@echo "$(GPU_WHEELS)/: $$(ls $(GPU_WHEELS)/*.whl | wc -l) wheels, $$(du -sh $(GPU_WHEELS) | cut -f1)"

# Installs into gpu_wheels/site only what GPU_PYTHON (the machine's Python with torch and triton) lacks, from
# gpu_wheels/ alone, then runs the check with gpu_wheels/site and the repo first on PYTHONPATH; nothing is written
# outside the repo. GPU_CHECK_FLAGS=--quick: the same steps at tiny sizes (also on a CPU).
# Triton's, inductor's, CUDA's, matplotlib's and the hub's caches go to gpu_wheels/cache.
GPU_CACHE = $(CURDIR)/$(GPU_WHEELS)/cache
GPU_CHECK_ENV = PYTHONUNBUFFERED=1 XDG_CACHE_HOME="$(GPU_CACHE)" TRITON_CACHE_DIR="$(GPU_CACHE)/triton" \
	TORCHINDUCTOR_CACHE_DIR="$(GPU_CACHE)/inductor" CUDA_CACHE_PATH="$(GPU_CACHE)/nv" MPLCONFIGDIR="$(GPU_CACHE)/mpl" \
	HF_HOME="$(GPU_CACHE)/huggingface"

gpu-check:
	$(GPU_CHECK_ENV) PYTHONPATH="$(CURDIR)" $(GPU_PYTHON) -m wadi_core.benchmarks gpu-check --install-wheels $(GPU_WHEELS)
	$(GPU_CHECK_ENV) PYTHONPATH="$(CURDIR)/$(GPU_WHEELS)/site:$(CURDIR)" \
		$(GPU_PYTHON) -m wadi_core.benchmarks gpu-check $(GPU_CHECK_FLAGS)

# Python and notebook caches and build leftovers; keeps .venv, data/ and results/.
clean:
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -print0 \
		| xargs -0 rm -rf
	rm -rf .pytest_cache build *.egg-info notebooks/*.failed.ipynb notebooks/.*.tmp.ipynb
