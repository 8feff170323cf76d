# Two commands on a fresh machine (see README):  make demo   and   make test
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test proto bench-ttft bench-fidelity bench-kernels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/bifrost demo $(ARGS)

# Exit code 5 ("no tests ran") is a failure here, as is any other non-zero code.
test: install
	$(BIN)/python -m pytest -q $(ARGS)

proto: install
	$(BIN)/python -m bifrost.proto.generate

# Benchmarks (not tests): each prints a table and writes JSON (and a plot) under benchmarks/results/.
bench-ttft: install
	$(BIN)/python benchmarks/ttft.py $(ARGS)

bench-fidelity: install
	$(BIN)/python benchmarks/fidelity.py $(ARGS)

bench-kernels: install
	$(BIN)/python benchmarks/kernels_bench.py $(ARGS)

clean:
	rm -rf $(VENV) runs
