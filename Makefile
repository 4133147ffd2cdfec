# `make demo` and `make test` create .venv on first use.
# torch is installed first from its pinned CPU wheel: any other spec pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export OMP_WAIT_POLICY := PASSIVE
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# `make demo ARGS="--set sft.max_steps=100"` passes overrides to the chain (see README).
demo: $(STAMP)
	$(PY) recipes/demo.py --overwrite true $(ARGS)

# Two workers, one test file each at a time (module fixtures stay in one worker): the suite is mostly
# interpreter start-up and single-threaded Python, so the second core halves its wall time.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: $(STAMP)
	$(PY) benchmarks/model_speed.py

clean:
	rm -rf outputs .pytest_cache
