# Every target creates/reuses .venv and installs what it needs (see docs/architecture.md, "Install").
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU build on this machine's disk; pick another build (e.g. CUDA) by overriding TORCH.
TORCH ?= torch==2.13.0
PIP := $(PYTHON) -m pip install -q -c .ci/constraints.txt

.PHONY: install install-test nltk-data demo test test-unit bench docs results clean

$(VENV)/.base: pyproject.toml .ci/constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q $(TORCH)   # first, so the range in pyproject.toml installs nothing more
	$(PIP) -e .
	bash scripts/install_wordnet.sh $(PYTHON)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

nltk-data:
	bash scripts/install_wordnet.sh $(PYTHON)

DEMO_RUNS ?= $(HOME)/raypipe-runs
DEMO_PREPARED ?= $(HOME)/.cache/raypipe/prepared

# The built-in sample: prepare, train image-only / text-only / fusion on the same split, evaluate fusion.
demo: install
	$(VENV)/bin/raypipe prepare output=$(DEMO_PREPARED) overwrite=true
	$(VENV)/bin/raypipe ablation prepared=$(DEMO_PREPARED) run.storage_path=$(DEMO_RUNS) run.name=demo optim.epochs=8
	$(VENV)/bin/raypipe evaluate bundle=$(DEMO_RUNS)/demo-fusion/bundle prepared=$(DEMO_PREPARED)
	$(VENV)/bin/raypipe label bundle=$(DEMO_RUNS)/demo-fusion/bundle output=$(DEMO_RUNS)/demo-labels overwrite=true

test: install-test
	$(PYTHON) -m pytest --durations=15

test-unit: install-test
	$(PYTHON) -m pytest tests/unit

bench: install-test
	@for script in $(filter-out benchmarks/common.py,$(wildcard benchmarks/*.py)); do \
		echo "== $$script"; $(PYTHON) $$script || exit 1; done

# docs/configuration.md from the config models' field descriptions (a unit test fails when it is stale).
docs: install
	$(PYTHON) -m raypipe.tools.configdoc

# The paper's ablation on two real sets, scored on their held-out test splits: docs/results.md and
# docs/images/{tuxpaint,emoji}_*.png. Needs `apt-get install tuxpaint-stamps-default` and npm (see docs/results.md).
RESULTS_SETS ?= tuxpaint emoji
results: install
	$(PIP) -e '.[results]'
	for set in $(RESULTS_SETS); do PY=$(PYTHON) bash docs/examples/results.sh $$set || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
