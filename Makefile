# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_output
DEMO_EPOCHS ?= 10
DEMO_CONFIG ?= 2d
export SAMPLAN_RAW ?= $(CURDIR)/$(DEMO_DIR)/raw
export SAMPLAN_PREPROCESSED ?= $(CURDIR)/$(DEMO_DIR)/preprocessed
export SAMPLAN_RESULTS ?= $(CURDIR)/$(DEMO_DIR)/results

.PHONY: venv demo test clean

$(VENV)/.installed: setup.py constraints-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned for CI through the constraints file; setup.py keeps open ranges for users
	$(PY) -m pip install --quiet -c constraints-ci.txt torch torchvision
	# sam2 builds against the installed torch (no second torch) and without its optional CUDA extension
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --no-build-isolation -c constraints-ci.txt sam2
	# onnx: the optional ONNX Runtime encoder engine, so that its tests run (two binary wheels, ~35 MB)
	$(PY) -m pip install --quiet -c constraints-ci.txt -e ".[test,onnx]"
	touch $@

venv: $(VENV)/.installed

# the whole pipeline on a generated dataset: plan, preprocess, train the 2D U-Net baseline briefly on the 12
# training cases, predict the 4 held-out cases and evaluate them. 2D because on 2 CPU cores it learns both
# structures in about 4 minutes (10 x 25 iterations, ~21 s per epoch), where the 3D plan needs ~35 minutes and
# still misses the small one (measured 2026-12-02, see README "Demo").
demo: venv
	$(VENV)/bin/samplan_make_demo_dataset -o "$(SAMPLAN_RAW)" --test-cases 4
	$(VENV)/bin/samplan_plan_and_preprocess -d Demo -np 2
	$(VENV)/bin/samplan_train -d Demo -m unet -c $(DEMO_CONFIG) -f all --epochs $(DEMO_EPOCHS) --iters-per-epoch 25 --val-iters 4
	$(VENV)/bin/samplan_predict -i "$(SAMPLAN_RAW)/Dataset999_Demo/imagesTs" -o "$(DEMO_DIR)/predictions" -d Demo -m unet -c $(DEMO_CONFIG) -f all
	$(VENV)/bin/samplan_evaluate -gt "$(SAMPLAN_RAW)/Dataset999_Demo/labelsTs" -pred "$(DEMO_DIR)/predictions" -d Demo

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
