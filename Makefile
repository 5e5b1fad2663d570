# Chorus: `make run` starts a server, `make test` runs the suite. Both set up .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FUZZ_SECONDS ?= 60
ARGS ?=
BENCH_ARGS ?=

.PHONY: install run test fuzz bench bench-smoke clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,fuzz,bench]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/chorus-server $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# Coverage-guided fuzzing of the frame decoder; FUZZ_SECONDS=600 make fuzz for longer.
fuzz: $(STAMP)
	$(BIN)/python fuzz/fuzz_framing.py -max_total_time=$(FUZZ_SECONDS) fuzz/corpus

# Chorus vs Mosquitto vs websockets (issue 6): a few minutes, CPU-heavy; writes bench/results/bench.{json,png}
# and a py-spy profile of the fan-out. BENCH_ARGS="--reps 5 --scenarios fanout" to change what runs.
bench: $(STAMP)
	$(BIN)/python -m bench --profile $(BENCH_ARGS)

# The same harness at tiny sizes (seconds); `make test` runs it too, via tests/test_bench_smoke.py.
bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
