# Every target sets itself up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench lock clean browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,dev,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/pruning.py

test: $(STAMP) browser
	$(PY) -m pytest

# The report is tested in a real headless browser: Debian's chromium, installed where we may
# (root with apt-get); elsewhere those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1 \
	      || echo "could not install chromium: the browser tests will skip"; \
	  else echo "chromium is not installed (needs root and apt-get): the browser tests will skip"; fi; }

lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_store.py
	$(PY) benchmarks/bench_orchestrate.py
	$(PY) benchmarks/bench_cold.py
	$(PY) benchmarks/bench_collab.py
	$(PY) benchmarks/bench_lab.py
	$(PY) benchmarks/bench_results.py
	$(PY) benchmarks/bench_soak.py

# Re-resolve the pins after changing dependencies (then run `make test`).
lock:
	rm -rf /tmp/dagger-lock && $(PYTHON) -m venv /tmp/dagger-lock
	/tmp/dagger-lock/bin/pip install --quiet -e '.[test,dev,examples]'
	(head -2 constraints.txt; /tmp/dagger-lock/bin/pip freeze --exclude-editable) > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
