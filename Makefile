# Two entry points (see README): `make demo` and `make test`. Both build their own virtual environment.
# torch is installed pinned *first*; everything after is constrained to keep it (an unpinned torch pulls GBs of CUDA).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/beauty
DEMO_OUT ?= runs/demo

.PHONY: install test demo lint clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/semid demo --data $(DATA) --out $(DEMO_OUT)

lint: install
	$(VENV)/bin/ruff check semid rqvae generator experiments tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
