# Quickstart: `make demo` (venv, install, synthetic data, a short BYOL+LCR run, report) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := demo_out

.PHONY: demo test lint bench install clean

install: $(VENV)/.installed

# The exact versions of constraints.txt, DALI for CUDA 13 (the demo and the tests run DALI's pipelines),
# pytest and ruff. Editing what the package declares or pins re-runs it.
$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[cuda13,test]'
	touch $@

demo: install
	$(PY) -m lcr_fast.data.synthetic --out $(DEMO)/data --demo
	rm -rf $(DEMO)/run
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" deepspeed --num_gpus 1 lcr_fast/train.py -c configs/demo.yaml \
		--data_dir $(DEMO)/data --log_dir $(DEMO)/run --ckpt_dir $(DEMO)/run/ckpt
	@echo; cat $(DEMO)/run/report.md

test: install
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) benchmarks/step_bench.py
	$(PY) benchmarks/retrieval_bench.py

clean:
	rm -rf $(DEMO) build *.egg-info
