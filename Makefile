# Chorus: `make run` starts a server, `make test` runs the suite. Both set up .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FUZZ_SECONDS ?= 60
ARGS ?=

.PHONY: install run test fuzz bench bench-smoke clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,fuzz]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/chorus-server $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# Coverage-guided fuzzing of the frame decoder; FUZZ_SECONDS=600 make fuzz for longer.
fuzz: $(STAMP)
	$(BIN)/python fuzz/fuzz_framing.py -max_total_time=$(FUZZ_SECONDS) fuzz/corpus

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
