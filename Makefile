# One virtual environment per set of pins; torch is installed first, pinned to the CPU build, so that no other
# requirement can pull a multi-GB CUDA build. `make test` is the newest releases allowed by setup.cfg in .venv;
# `make test-transformers4` is the same target in a second environment pinned to transformers 4.x and to the
# oldest peft and accelerate that setup.cfg allows (see TRANSFORMERS4_PINS).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# requirements installed together with this package, over setup.cfg's ranges, e.g. PINS="transformers==4.57.6"
PINS ?=
# one stamp per set of pins, so that changing PINS reinstalls
STAMP := $(VENV)/.installed$(if $(strip $(PINS)),-$(shell echo '$(strip $(PINS))' | md5sum | cut -c1-8))

TRANSFORMERS4_VENV := build/venv-transformers4
TRANSFORMERS4_PINS := transformers==4.57.6 peft==0.21.0 accelerate==1.3.0

.PHONY: install test test-transformers4 test-peft-suite lint demo clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]" $(foreach pin,$(PINS),"$(pin)")
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check peft_mimi tests examples benchmarks
	@$(BIN)/python -c "from importlib.metadata import version as v; \
		print('testing with', *(f'{p} {v(p)}' for p in ('torch', 'transformers', 'peft', 'accelerate')))"
	$(BIN)/python -m pytest -n 2 tests

test-transformers4:
	$(MAKE) test VENV=$(TRANSFORMERS4_VENV) PINS="$(TRANSFORMERS4_PINS)"

# PEFT's own custom-model tests (from the installed peft's sdist) with MiMi rows: tests/peft_suite/
test-peft-suite: $(STAMP)
	$(BIN)/python tests/peft_suite/run.py

lint: $(STAMP)
	$(BIN)/ruff check peft_mimi tests examples benchmarks

demo: $(STAMP)
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) $(TRANSFORMERS4_VENV) build *.egg-info
