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

DEMO_TRACE := traces/fio-randrw-mixed-fsync.iolog.gz

demo: $(VENV)/.installed-demo
	@mkdir -p out
	@echo "== Replaying $(DEMO_TRACE) (real fio recording) over cluster sizes x extended_l2 x L2 cache sizes"
	@$(BIN)/qsim sweep $(DEMO_TRACE) --cluster-size 16k,64k,128k,512k,2M --extended-l2 off,on \
		--l2-cache-size 64k,1M,default --save out/demo-sweep.csv
	@$(BIN)/qsim plot tradeoff out/demo-sweep.csv --save out/demo-tradeoff.png
	@$(BIN)/qsim sweep $(DEMO_TRACE) --cluster-size 64k,2M --extended-l2 off,on --l2-cache-size 16k..8M,default \
		--save out/demo-mrc.csv --output=csv > /dev/null
	@$(BIN)/qsim plot mrc out/demo-mrc.csv --save out/demo-mrc.png
	@echo
	@echo "== How much L2 cache does a 4T disk with 128k clusters and extended_l2 need?"
	@$(BIN)/qsim size 4T -o cluster_size=128k,extended_l2=on

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
