# Two commands on a fresh machine:
#   make demo   prep the bundled sample data and print a report (no downloads)
#   make test   the whole test suite: Rust (cargo test) + Python (pytest on the installed wheel)
# Both set up everything they need in .venv first (venv, maturin build, wheel install).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
WHEELS := target/wheels-dist

.PHONY: demo test test-rust test-python lint install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "maturin>=1.12.1,<2"
	rm -rf $(WHEELS)
	$(BIN)/maturin build --release --quiet --out $(WHEELS)
	$(BIN)/pip install -q "$$(ls $(WHEELS)/prefops-*.whl)[test]"
	$(BIN)/pip install -q --force-reinstall --no-deps $(WHEELS)/prefops-*.whl

demo: install
	$(BIN)/prefops demo

test-rust:
	cargo test --release -p prefops-core

test-python: install
	$(BIN)/python -m pytest tests

test: test-rust test-python

# Clippy with warnings as errors (CI runs it after the tests).
lint:
	cargo clippy --release --workspace --all-targets --quiet -- -D warnings

bench: install
	$(BIN)/python benches/bench_prep.py

clean:
	rm -rf $(VENV) target .pytest_cache .hypothesis
