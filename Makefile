# make demo: set up .venv and train the tiny CPU demo on the embedded corpus.
# make test: set up .venv and run the test suite.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin
# On CPU every step allocates logits of batch x 50304 floats afresh; backing large allocations with
# transparent huge pages (glibc >= 2.35; ignored elsewhere) halves the demo's step time.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python train_gpt.py configs/cpu_demo.py

$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q tests

.PHONY: demo test
