# The two commands of the README. Both build the environment first when it is missing or stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,plots,diffusers,nsfw,tui

.PHONY: demo test lint env clean

demo: $(VENV)/.installed
	$(BIN)/trig-stream make-tiny-models runs/tiny-models
	$(BIN)/trig-stream run config/demo.toml

test: $(VENV)/.installed
	$(BIN)/pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check trig_stream tests bench
	$(BIN)/ruff format --check trig_stream tests bench
	$(BIN)/mypy trig_stream tests

env: $(VENV)/.installed

# torch comes only through constraints.txt (the CPU build); see env notes in the README.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

clean:
	rm -rf $(VENV) runs
