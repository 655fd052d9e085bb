# mnv3-serve: every target creates .venv itself; `make serve` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# The model `make serve` builds when it is missing (override: make serve ARCH=small WEIGHTS=path.pth).
ARCH    ?= large
WEIGHTS ?= imagenet
MODEL   ?= build/mobilenet_v3_$(ARCH).onnx

.PHONY: serve test lint model proto bench image arm64-smoke clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export,dev]'
	touch $@

model: $(MODEL)

# Download fails (offline box)? Fall back to random weights, loudly: the server still runs,
# its answers do not mean anything. The export CLI itself never falls back.
$(MODEL): | $(BIN)/.installed
	@mkdir -p $(dir $@)
	@$(BIN)/python -m models.export --arch $(ARCH) --weights $(WEIGHTS) --out $@ || { \
	  echo; \
	  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"; \
	  echo "!! WARNING: could not get '$(WEIGHTS)' weights; exporting RANDOM weights instead."; \
	  echo "!! The server will run, but its PREDICTIONS ARE MEANINGLESS."; \
	  echo "!! Supply weights:  rm $@ && make serve WEIGHTS=/path/to/state_dict.pth"; \
	  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"; \
	  echo; \
	  $(BIN)/python -m models.export --arch $(ARCH) --weights random --out $@; }

serve: $(MODEL)
	MNV3_MODEL_PATH=$(MODEL) $(BIN)/python -m service

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
