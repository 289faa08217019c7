# Set-up and the main commands. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test lint optimize clean

# torch 2.13.0 first: on the project's machines pip takes a local CPU build for Python 3.11
# (an unpinned torch would pull a multi-GB CUDA build); the dev extra's range then installs nothing more.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# The test command (README): lint, then the whole suite. pytest's exit code 5 ("no tests collected")
# is reported as a failure of its own rather than passing silently.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# The main job: the search on the shipped default (dev-supernet evaluations, the 15B H200 cost table at 32K,
# max_fit), which prints the front and the presets and writes presets.json, front.csv and front.png to out/optimize;
# then the presets exported to every serving format beside them.
OPT := out/optimize
optimize: $(STAMP)
	$(BIN)/placement-search optimize --out $(OPT)
	$(BIN)/placement-search export $(OPT)/presets.json --format fast-llm-yaml --out $(OPT)/placements.yaml
	$(BIN)/placement-search export $(OPT)/presets.json --format vllm --out $(OPT)/vllm
	$(BIN)/placement-search export $(OPT)/presets.json --format deployment-config --out $(OPT)/deployment

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache .ruff_cache
