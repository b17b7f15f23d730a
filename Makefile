# Two commands do all the set-up on a fresh machine with Python >= 3.11, pip and make:
#   make demo   -- create .venv, install qsim, run the main job on the bundled default trace
#   make test   -- create .venv, install qsim with its test extras, run the whole suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[progress]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,progress]'
	touch $@

demo: $(VENV)/.installed-demo
	@$(BIN)/qsim size 100G
	@echo
	@$(BIN)/qsim size 4T -o cluster_size=128k,extended_l2=on
	@echo
	@$(BIN)/qsim measure 2T

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
