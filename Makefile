# The README promises exactly two commands: `make test` and `make demo`.
# Both first run scripts/ensure-deps.sh (Debian packages, .venv), which is
# quick when everything is already in place.

VENV := .venv
PYTHON := $(VENV)/bin/python
LINTED := gateway tests bench twisted

.PHONY: test demo deps lint

# Lint and tests both run, so a style slip does not hide test results; the
# target fails if either fails. pytest exits 5 when it collects no tests,
# which fails the target like any other non-zero status: never green on empty.
test: deps
	@status=0; \
	$(VENV)/bin/ruff check $(LINTED) || status=1; \
	$(PYTHON) -m pytest $(PYTEST_ARGS) || status=1; \
	exit $$status

demo: deps
	$(PYTHON) -m tests.harness.demo

lint: deps
	$(VENV)/bin/ruff check $(LINTED)

deps:
	@scripts/ensure-deps.sh
