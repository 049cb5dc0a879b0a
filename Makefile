# Two commands from a fresh clone: `make demo` and `make test`. Each creates the virtual environment
# on first use, with torch installed first and pinned (an unpinned torch pulls a multi-GB CUDA build
# on CPU machines); rerun after editing pyproject.toml and the environment is updated.
#   make demo OUT=/tmp/d            where the demo writes its report (default: runs/demo)
#   make test ARGS="-m slow"        arguments for pytest
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu121"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
S3PRL ?= s3prl==0.4.18
OUT ?= runs/demo
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# s3prl's source, unpacked by the tests only (its package imports torchaudio): see tests/test_s3prl.py
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: --dest $(VENV)/sdists $(S3PRL)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/speechmimic demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)
