# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_output
export SAMPLAN_RAW ?= $(CURDIR)/$(DEMO_DIR)/raw
export SAMPLAN_PREPROCESSED ?= $(CURDIR)/$(DEMO_DIR)/preprocessed
export SAMPLAN_RESULTS ?= $(CURDIR)/$(DEMO_DIR)/results

.PHONY: venv demo test clean

$(VENV)/.installed: setup.py constraints-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned for CI through the constraints file; setup.py keeps open ranges for users
	$(PY) -m pip install --quiet -c constraints-ci.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints-ci.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/samplan_make_demo_dataset -o "$(SAMPLAN_RAW)"
	$(VENV)/bin/samplan_plan_and_preprocess -d Demo -np 2

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
