# fastflow: `make demo` trains Flow Map Matching on the built-in digits (CPU, minutes);
# `make test` runs the test suite. Both set up .venv on first use; re-runs reuse it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.fastflow-installed

.PHONY: demo test test-all bench install clean

install: $(STAMP)

# torch comes first: the C++ extension in csrc/ builds against it (--no-build-isolation, so
# pip does not fetch a second torch into an isolated build environment).
$(STAMP): setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet --disable-pip-version-check --no-build-isolation -e ".[dev]"
	touch $(STAMP)

# --resume auto: a re-run continues the demo's run (an interrupted one goes on, a finished one
# says so and writes its final grid again) instead of refusing to start over its checkpoints.
demo: $(STAMP)
	$(PY) train.py --config configs/fmm_digits.yaml --resume auto

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

bench: $(STAMP)
	$(PY) -m pytest bench/ --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info fastflow/_C*.so
