# The README promises exactly two commands: `make test` and `make demo`.
# Both first run scripts/ensure-deps.sh (Debian packages, .venv), which is
# quick when everything is already in place.

VENV := .venv
PYTHON := $(VENV)/bin/python
LINTED := gateway tests bench twisted

.PHONY: test demo deps lint typecheck

# Lint, type check and tests all run, so a style slip or a type error does not
# hide test results; the target fails if any of them fails. mypy checks what
# pyproject.toml's [tool.mypy] names (gateway, twisted/plugins) with Twisted's
# profile. pytest exits 5 when it collects no tests, which fails the target
# like any other non-zero status: never green on empty.
test: deps
	@status=0; \
	$(VENV)/bin/ruff check $(LINTED) || status=1; \
	$(VENV)/bin/mypy || status=1; \
	$(PYTHON) -m pytest $(PYTEST_ARGS) || status=1; \
	exit $$status

demo: deps
	$(PYTHON) -m tests.harness.demo

lint: deps
	$(VENV)/bin/ruff check $(LINTED)

typecheck: deps
	$(VENV)/bin/mypy

deps:
	@scripts/ensure-deps.sh
