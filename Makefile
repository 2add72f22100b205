# Convenience targets; the README shows the plain commands they run.
PY ?= python3

.PHONY: install test test-fast demo lint
install:
	$(PY) -m pip install -e ".[dev]"
test:
	$(PY) -m pytest
test-fast:
	$(PY) -m pytest -m "not slow"
demo:
	mpo demo
lint:
	ruff check mpo reward tests scripts
