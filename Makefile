# Set-up and the main commands. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test lint demo clean

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

# The main job, until `placement-search optimize` lands: check the example presets, predict their decode
# throughput on the H200 from the shipped 15B cost table, and export them to every serving format (out/).
EXAMPLE := examples/hand-picked-15b.presets.json
demo: $(STAMP)
	$(BIN)/placement-search validate $(EXAMPLE)
	for code in $$($(BIN)/python -c "from placement_search.presets import read_presets; \
	    print(' '.join(p.placement.code() for p in read_presets('$(EXAMPLE)').presets))"); do \
	  $(BIN)/placement-search throughput $$code --context 32768 --batch-policy max_fit || exit 2; \
	done
	$(BIN)/placement-search export $(EXAMPLE) --format fast-llm-yaml --out out/placements.yaml
	$(BIN)/placement-search export $(EXAMPLE) --format vllm --out out/vllm
	$(BIN)/placement-search export $(EXAMPLE) --format deployment-config --out out/deployment

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache .ruff_cache
