# Chorus: `make run` starts a server, `make test` runs the suite. Both set up .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FUZZ_SECONDS ?= 60
ARGS ?=
# The WebSocket bridge and chat page of `make run` (http://127.0.0.1:7421/); WS_PORT= turns it off.
WS_PORT ?= 7421
BENCH_ARGS ?=
# The cluster section of `make bench` (issue 11; ~10 min on a quiet machine): CLUSTER_ARGS="--size scale_conns=20000"
# for a quick scale row, "--scenarios fanout durable" to skip the 100,000 connections.
CLUSTER_ARGS ?=

.PHONY: run-cluster fuzz-session install run test test-js js-tables js-vectors corpus browser screenshot fuzz bench bench-smoke clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,fuzz,bench,node]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/chorus-server $(if $(WS_PORT),--ws-port $(WS_PORT)) $(ARGS)

# Node mode (issue 11): NODES chorus-server processes sharing port 7420 (and the page on 7421) with SO_REUSEPORT,
# linked by this machine's Redis, storing in its PostgreSQL (database "chorus", created if missing). Ctrl-C stops.
NODES ?= 3
run-cluster: $(STAMP)
	$(BIN)/python -m bench.cluster --nodes $(NODES) $(ARGS)

# The suite includes the JavaScript codec (node --test, via tests/test_js_codec.py) and the browser test.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q $(ARGS)

# Only the page's codec against the spec's vectors (tests/js/vectors.json).
test-js:
	node --test tests/js/codec.test.mjs

# Regenerate the page codec's constants, enums and field tables (the GENERATED block of server/static/chorus.js)
# from proto/; tests/test_js_codec.py fails while the block is stale.
js-tables: $(STAMP)
	$(BIN)/python spec/gen_js.py --write

# Regenerate the page's tables and tests/js/vectors.json after a change to spec/PROTOCOL.md or proto/.
js-vectors: js-tables
	$(BIN)/python tests/test_js_codec.py --write

# tests/test_browser.py drives Debian's Chromium, never a downloaded browser: install it when it is missing
# and apt is usable (root). Otherwise the test skips (and fails under CI=true).
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  echo "installing Debian's chromium for tests/test_browser.py" && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; }; } || \
	  echo "chromium is not installed: tests/test_browser.py will skip (or fail under CI=true)"

# Refresh docs/screenshot.png (phone) and docs/screenshot-wide.png: the chat page after the browser test's chat.
screenshot: $(STAMP) browser
	CI=true CHORUS_SCREENSHOT_DIR=docs $(BIN)/python -m pytest -q tests/test_browser.py

# Rewrite fuzz/corpus/'s seeds (one per frame type, sessions, the spec's examples) after a change to proto/ or the
# spec; tests/test_fuzz_short.py fails while a frame type has no seed or a seed is stale.
corpus: $(STAMP)
	$(BIN)/python fuzz/make_corpus.py

# Coverage-guided fuzzing of the frame decoder; FUZZ_SECONDS=600 make fuzz for longer.
fuzz: $(STAMP)
	mkdir -p fuzz/corpus-new
	$(BIN)/python fuzz/fuzz_framing.py -max_total_time=$(FUZZ_SECONDS) fuzz/corpus-new fuzz/corpus

# Long runs of the session-level fuzzer (issue 9); FUZZ_EXAMPLES=5000 make fuzz-session for longer.
FUZZ_EXAMPLES ?= 2000
fuzz-session: $(STAMP)
	$(BIN)/python fuzz/fuzz_session.py --examples $(FUZZ_EXAMPLES)

# Chorus vs Mosquitto vs websockets (issues 6, 9 and 14): ~25 minutes, CPU-heavy (the GC rows log in 18,000 clients
# six times); writes bench/results/bench.{json,md,png} and py-spy profiles. BENCH_ARGS="--reps 5 --scenarios
# fanout" to change what runs (scenarios: fanout, durable, idle, rooms, gc, storm, attack).
bench: $(STAMP)
	$(BIN)/python -m bench --profile $(BENCH_ARGS)
	$(BIN)/python -m bench.cluster_bench $(CLUSTER_ARGS)
	$(BIN)/python -m bench.tls_fanout --members 500 | tee bench/results/tls_fanout.txt

# The same harness at tiny sizes (seconds); `make test` runs it too, via tests/test_bench_smoke.py.
bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke $(BENCH_ARGS)
	$(BIN)/python -m bench.cluster_bench --smoke

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
