# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.torchkeep-installed
DEMO_DIR ?= demo-run
# Where pip finds torch. Empty: pip's configured index (PyPI's Linux wheel is the CUDA build).
# CPU-only machine: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: demo test install bench clean chromium docs

install: $(STAMP)

# torch first, pinned; then everything else under a constraints file that keeps that torch,
# so pip never resolves torch (and CUDA) a second time on its own.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# DS_BUILD_OPS=0: DeepSpeed (a test-only writer) builds no C++/CUDA ops; it runs on its CPU accelerator
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -c constraints.txt -e '.[test,docs]'
	# timm without its torchvision requirement (the only torchvision wheel for torch 2.13 is a CUDA
	# build); its other needs come with transformers. torchvision (for timm in the tests only) goes
	# beside, not in, the environment: see tests/_timm.py
	$(PY) -m pip install --quiet -c constraints.txt --no-deps 'timm>=1.0'
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/torchvision-nodeps torchvision==0.28.0 \
	  || echo "note: torchvision not installed; the timm tests will be skipped"
	touch $(STAMP)

# The API reference, generated from the docstrings by pdoc into docs/api/ (not committed).
# The subpackages are named: the top level's __all__ lists only the verbs, and pdoc follows it.
DOC_MODULES := torchkeep torchkeep.read torchkeep.store torchkeep.keep torchkeep.carry \
               torchkeep.shape torchkeep.look torchkeep.integrations torchkeep.errors
docs: $(STAMP)
	rm -rf docs/api
	$(PY) -m pdoc --docformat restructuredtext -o docs/api $(DOC_MODULES)
	@echo "open docs/api/index.html"

demo: $(STAMP)
	$(VENV)/bin/torchkeep demo --dir $(DEMO_DIR)

test: $(STAMP) chromium
	$(PY) -m pytest -n 2 -q --durations=15

# The HTML report's browser test needs Chromium: installed from Debian when we are root with
# apt; anywhere else the test skips (never a failure of the set-up).
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "note: chromium not installed; tests/test_report_browser.py will be skipped"

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache build *.egg-info src/*.egg-info docs/api
