# make demo: set up and train the tiny model on the embedded demo (CPU, about 5 min on 2 cores)
# make test: set up, lint (ruff, pyproject.toml) and run the test suite (all but the tests marked slow; make slow runs those)
VENV ?= .venv
PYTHON := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test slow setup system

demo: $(VENV)/.installed
	$(PYTHON) train.py

test: system $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -m "not slow"

slow: system $(VENV)/.installed
	$(PYTHON) -m pytest -m slow

setup: system $(VENV)/.installed

# espeak-ng speaks the test corpora (the demo corpus is committed, so `make demo` does not need it);
# slurm-wlm and munge make the one-node SLURM cluster the tests submit jobs to (slurm/local.sh starts it).
SYSTEM_PACKAGES := espeak-ng slurmctld slurmd slurm-client munge
system:
	@command -v espeak-ng >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null || \
		{ $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); }

# The venv is made once and reused; it is refreshed when requirements.txt or this file changes.
$(VENV)/.installed: requirements.txt Makefile
	[ -x $(PYTHON) ] || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install -r requirements.txt
	# pyctcdecode 0.5.0 (beam search with an n-gram LM, what transformers' Wav2Vec2ProcessorWithLM runs)
	# declares numpy<2, a stale bound: datasets needs pyarrow>=24, which needs numpy 2, and pyctcdecode
	# runs on numpy 2 (the tests decode with it). pip cannot take it from requirements.txt beside
	# numpy 2, so it comes without its declared dependencies (pygtrie is in requirements.txt).
	$(PYTHON) -m pip install --no-deps pyctcdecode==0.5.0
	touch $@
