# Every target sets itself up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench lock clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,dev,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/pruning.py

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_store.py
	$(PY) benchmarks/bench_orchestrate.py
	$(PY) benchmarks/bench_collab.py
	$(PY) benchmarks/bench_lab.py

# Re-resolve the pins after changing dependencies (then run `make test`).
lock:
	rm -rf /tmp/dagger-lock && $(PYTHON) -m venv /tmp/dagger-lock
	/tmp/dagger-lock/bin/pip install --quiet -e '.[test,dev,examples]'
	(head -2 constraints.txt; /tmp/dagger-lock/bin/pip freeze --exclude-editable) > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
