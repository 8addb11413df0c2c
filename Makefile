# The README promises exactly two commands: `make test` and `make demo`.
# Both first run scripts/ensure-deps.sh (Debian packages, .venv), which is
# quick when everything is already in place.

VENV := .venv
PYTHON := $(VENV)/bin/python
LINTED := gateway tests bench twisted

.PHONY: test demo deps lint

test: deps lint
	@# pytest exits 5 when it collects no tests; like any non-zero status
	@# that fails the target, so an empty or mis-configured run is never green.
	$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: deps
	$(PYTHON) -m gateway.demo

lint: deps
	$(VENV)/bin/ruff check $(LINTED)

deps:
	@scripts/ensure-deps.sh
