# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers for make test and make test-long (the multi-host suites stay serial: their
# namespaces and links are machine-wide); TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= 2

.PHONY: demo test test-long test-hosts test-faults soak lint bench bench-quick bench-snapshot bench-history bench-transfer bench-merge bench-run bench-sandbox bench-gateway bench-chain bench-web clean

# (the install compiles narrative/_listing.c: a change to it or to its build hook reinstalls)
$(STAMP): pyproject.toml hatch_build.py narrative/_listing.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job on embedded defaults: snapshot, change, diff, restore
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: $(STAMP)  ## the test suite, under ten minutes (CI runs it and test-long)
	$(BIN)/pytest -q -n $(TEST_WORKERS) -m "not long and not hosts" --durations=20

test-long: $(STAMP)  ## the long tests: the model-based store test (ci profile), the wheel install, reused-environment attacks, the slower hub tests (Docker, TLS, hybrid, team, EC2 on moto)
	$(BIN)/pytest -q -n $(TEST_WORKERS) -m long --durations=10

test-hosts: $(STAMP)  ## tests on a multi-host network of Linux namespaces (root; tests/multihost)
	$(BIN)/pytest -q -m "hosts and not faults" tests/multihost

test-faults: $(STAMP)  ## fault tests on the multi-host network: link drops, latency and loss, hub kill, reboots (root)
	$(BIN)/pytest -q -m faults tests/multihost

soak: $(STAMP)  ## every property test with random draws and 20x the examples, then the model-based store and watcher tests with their long hypothesis profiles, the store model also with the watcher on (~two hours)
	NARRATIVE_HYPOTHESIS_PROFILE=soak $(BIN)/pytest -q -n $(TEST_WORKERS) -m "property and not long" --timeout 0 --hypothesis-show-statistics
	NARRATIVE_HYPOTHESIS_PROFILE=soak $(BIN)/pytest -q tests/e2e/model tests/narrative/test_watch.py -k "model" --timeout 0 --hypothesis-show-statistics
	NARRATIVE_HYPOTHESIS_PROFILE=soak NARRATIVE_MODEL_WATCHER=1 $(BIN)/pytest -q tests/e2e/model --timeout 0 --hypothesis-show-statistics

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)  ## every benchmark against its anchor, one table of ratios, appended to bench/RESULTS.md (full sizes; takes a long while)
	$(BIN)/python bench/run_all.py --record $(ARGS)

bench-quick: $(STAMP)  ## the small profile of make bench (a few minutes); fails when a gated row is worse than 1.5x its goal (CI)
	$(BIN)/python bench/run_all.py --quick --gate $(ARGS)

bench-snapshot: $(STAMP)  ## snapshot and restore vs git alone (add ARGS=--quick for a smoke run)
	$(BIN)/python bench/bench_snapshot.py $(ARGS)

bench-history: $(STAMP)  ## a history of 10,000 snapshots: log, resolve, restore vs git on the same commits
	$(BIN)/python bench/bench_history.py $(ARGS)

bench-run: $(STAMP)  ## isolated-run overhead per provider (docker needs DOCKER_HOST)
	$(BIN)/python bench/bench_run.py $(ARGS)

bench-sandbox: $(STAMP)  ## worktree runs with and without the bwrap sandbox (target ≤ 1.1x)
	$(BIN)/python bench/bench_sandbox.py $(ARGS)

bench-transfer: $(STAMP)  ## export/import/remote benchmarks (add ARGS=--quick for a smoke run)
	$(BIN)/python bench/bench_transfer.py $(ARGS)

bench-merge: $(STAMP)  ## merge vs git merge-tree --write-tree (add ARGS=--quick for a smoke run)
	$(BIN)/python bench/bench_merge.py $(ARGS)

bench-gateway: $(STAMP)  ## gateway vs raw websockets echo (add ARGS=--quick for a smoke run)
	$(BIN)/python bench/bench_gateway.py $(ARGS)

bench-chain: $(STAMP)  ## hub: proxied calls vs raw echo, Docker run round trip vs docker cp/exec (ARGS=--quick)
	$(BIN)/python bench/bench_chain.py $(ARGS)

bench-web: $(STAMP)  ## a web view page of 1,000 runs vs narrative run list --json (target ≤ 2x)
	$(BIN)/python bench/bench_web.py $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
