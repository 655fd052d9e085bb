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
	MALLOC_ARENA_MAX=2 MNV3_MODEL_PATH=$(MODEL) exec $(BIN)/python -m service

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

# Regenerate the committed gRPC code (and its .pyi stubs) from protos/.
proto: $(BIN)/.installed
	$(BIN)/python protos/generate.py

# The benchmark on loopback (~10 min with the 5-minute soak); report in bench/results/.
# Quick look: make bench BENCH_ARGS="--seconds 3 --soak-seconds 0"
bench: $(BIN)/.installed
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Multi-arch image without emulation (see deploy/Dockerfile); needs docker buildx.
# One arch into the local docker: make image PLATFORMS=linux/arm64 IMAGE_OUTPUT=--load
PLATFORMS    ?= linux/amd64,linux/arm64
IMAGE        ?= mnv3-serve:0.1.0
IMAGE_OUTPUT ?= --output type=oci,dest=build/mnv3-serve.oci.tar
image:
	@mkdir -p build
	docker buildx build -f deploy/Dockerfile --platform $(PLATFORMS) \
	  --build-arg ARCH=$(ARCH) --build-arg WEIGHTS=$(WEIGHTS) \
	  --build-arg VERSION=$(lastword $(subst :, ,$(IMAGE))) \
	  --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	  --build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
	  -t $(IMAGE) $(IMAGE_OUTPUT) .

# ARM64 proof without binfmt_misc: the real server as an aarch64 process under qemu-user.
arm64-smoke: $(BIN)/.installed
	bash deploy/arm64/smoke.sh

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
