# Two commands on a fresh machine (see README):  make demo   and   make test
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test proto bench clean

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

clean:
	rm -rf $(VENV) runs
